//! Every rejection path, the cache, the refresh and the combination, against a crafted-reply
//! responder on loopback (no live server needed).

mod common;

use std::{
    error::Error as _,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{Reply, Responder};
use sync_core::{Backend, Error, ErrorKind, Time, TimeInterval};
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

/// `localhost` through the system resolver: each address it resolves to (127.0.0.1, and ::1
/// where the hosts file lists it too) is queried as a source of its own.
#[tokio::test]
async fn a_name_is_queried_at_each_of_its_addresses() {
    let v4 = Responder::start(Reply::good()).await;
    let port = v4.addr.port();
    let server = format!("localhost:{port}");
    let mut resolved: Vec<SocketAddr> = tokio::net::lookup_host(&server).await.unwrap().collect();
    resolved.dedup();
    let v6 = if resolved.contains(&SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], port))) {
        Some(Responder::start_on(&format!("[::1]:{port}"), Reply::good()).await)
    } else {
        eprintln!("localhost does not resolve to ::1 here: only 127.0.0.1 is queried");
        None
    };
    let client =
        Client::connect(Config::new([server.clone()]).with_timeout(Duration::from_millis(300)))
            .await
            .unwrap();
    let report = client.sync().await.unwrap();
    let mut used: Vec<_> = report.samples.iter().map(|s| s.address).collect();
    used.sort();
    resolved.sort();
    assert_eq!(used, resolved, "{report:?}");
    assert!(
        report.samples.iter().all(|s| s.server == server),
        "{report:?}"
    );
    assert_eq!(v4.queries(), 1);
    if let Some(v6) = v6 {
        assert_eq!(v6.queries(), 1);
        assert_eq!(report.samples.len(), 2, "{report:?}");
    }
}

/// 2017-01-01T00:00:00Z: the last leap second so far was inserted just before it.
const MIDNIGHT: u64 = 1_483_228_800;
const SECOND: i128 = 1_000_000_000;
const MS: i128 = 1_000_000;

fn unix_ns(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128
}

/// A crafted server around a leap second, and true Unix time by its clock.
struct LeapServer {
    responder: Responder,
    indicator: u8,
    offset_ms: i64,
}

impl LeapServer {
    /// A server announcing leap `indicator` whose clock is 600 ms before the leap now.
    async fn start(indicator: u8) -> LeapServer {
        let jump_ms = MIDNIGHT as i64 * 1_000 - if indicator == 2 { 1_000 } else { 0 };
        let now_ms = (unix_ns(SystemTime::now()) / MS) as i64;
        let offset_ms = jump_ms - 600 - now_ms;
        let responder = Responder::start(Reply::Leap {
            indicator,
            offset_ms,
            midnight: MIDNIGHT,
        })
        .await;
        LeapServer {
            responder,
            indicator,
            offset_ms,
        }
    }

    /// The server's clock now, counting every second (ns).
    fn counted(&self) -> i128 {
        unix_ns(SystemTime::now()) + i128::from(self.offset_ms) * MS
    }

    /// Where true Unix time jumps: at midnight back a second (insert), at 23:59:59 a second
    /// ahead (delete).
    fn jump(&self) -> i128 {
        i128::from(MIDNIGHT) * SECOND - if self.indicator == 2 { SECOND } else { 0 }
    }

    /// True Unix time at counted time `c`.
    fn unix(&self, c: i128) -> i128 {
        match (c >= self.jump(), self.indicator) {
            (true, 1) => c - SECOND,
            (true, _) => c + SECOND,
            (false, _) => c,
        }
    }
}

/// One call of `now_interval`, with the server's counted clock read around it.
struct Call {
    before: i128,
    after: i128,
    result: sync_core::Result<TimeInterval>,
}

/// Calls `now_interval` every 10 ms until `done` says so (a bounded wait: 10 s), checking that
/// every interval answered contains true Unix time (calls whose clock readings straddle the
/// jump are not checked: true time is either side) and that every error is Unavailable.
async fn calls_across_the_leap(
    server: &LeapServer,
    time: &dyn Time,
    done: impl Fn(&Call) -> bool,
) -> Vec<Call> {
    let mut calls = Vec::new();
    let polling = async {
        loop {
            let before = server.counted();
            let result = time.now_interval().await;
            let after = server.counted();
            let call = Call {
                before,
                after,
                result,
            };
            let straddles = call.before < server.jump() && call.after >= server.jump();
            match &call.result {
                Ok(iv) if !straddles => {
                    let (earliest, latest) = (unix_ns(iv.earliest()), unix_ns(iv.latest()));
                    let (from, to) = (server.unix(call.before), server.unix(call.after));
                    assert!(
                        earliest <= to && latest >= from,
                        "leap {}: the interval [{earliest}, {latest}] misses true time \
                         [{from}, {to}] ({} ms from the jump)",
                        server.indicator,
                        (call.before - server.jump()) / MS
                    );
                }
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}"),
            }
            let finished = done(&call);
            calls.push(call);
            if finished {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), polling)
        .await
        .expect("the server's clock did not pass the leap within 10 s");
    calls
}

/// A leap second carried across with the default maximum error: the interval is widened by the
/// second once it reaches the leap, and contains true Unix time all along, without a resync.
async fn carried_across_the_leap(indicator: u8) {
    let server = LeapServer::start(indicator).await;
    let client = Client::connect(config(&[&server.responder])).await.unwrap();
    let time = client.time().unwrap();
    time.now_interval().await.unwrap();
    let report = client.last_sync().unwrap();
    let leap = report.leap.expect("no leap recorded");
    assert_eq!(leap.midnight, UNIX_EPOCH + Duration::from_secs(MIDNIGHT));
    assert_eq!((leap.insert, leap.delete), (indicator == 1, indicator == 2));
    assert_eq!(report.samples[0].leap_indicator, indicator);

    let jump = server.jump();
    let calls =
        calls_across_the_leap(&server, time.as_ref(), |c| c.before >= jump + 300 * MS).await;
    let width = |c: &Call| c.result.as_ref().unwrap().width();
    // Narrow until the interval reaches the leap, a second wider after it.
    let early: Vec<_> = calls.iter().filter(|c| c.after < jump - 100 * MS).collect();
    let late: Vec<_> = calls.iter().filter(|c| c.before >= jump).collect();
    assert!(!early.is_empty() && !late.is_empty());
    for c in early {
        assert!(width(c) < Duration::from_millis(100), "{:?}", width(c));
    }
    for c in late {
        let w = width(c);
        assert!(
            w >= Duration::from_secs(1) && w < Duration::from_millis(1_100),
            "{w:?}"
        );
    }
    assert_eq!(server.responder.queries(), 1, "carried, not resynced");
}

#[tokio::test]
async fn an_inserted_leap_second_at_midnight_utc_is_allowed_for() {
    carried_across_the_leap(1).await;
}

#[tokio::test]
async fn a_deleted_leap_second_at_midnight_utc_is_allowed_for() {
    carried_across_the_leap(2).await;
}

/// With a maximum error under half a second the widened interval is refused: calls fail
/// Unavailable (never a wrong interval) until a resync past the leap, whose reply is in
/// post-leap time, narrows it again.
#[tokio::test]
async fn a_leap_wider_than_the_maximum_error_forces_a_resync() {
    let case = |indicator| async move {
        let server = LeapServer::start(indicator).await;
        let client = Client::connect(
            config(&[&server.responder]).with_max_error(Duration::from_millis(100)),
        )
        .await
        .unwrap();
        let time = client.time().unwrap();
        let jump = server.jump();
        let calls = calls_across_the_leap(&server, time.as_ref(), |c| {
            c.before >= jump && c.result.is_ok()
        })
        .await;
        let last = calls.last().unwrap().result.as_ref().unwrap();
        assert!(last.width() < Duration::from_millis(100), "{last:?}");
        assert!(server.responder.queries() >= 2, "no resync");
        let report = client.last_sync().unwrap();
        assert_eq!(report.leap, None, "{report:?}");
    };
    tokio::join!(case(1), case(2));
}
