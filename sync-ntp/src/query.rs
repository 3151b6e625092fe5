//! One SNTP exchange (RFC 4330 / RFC 5905 client mode) with one server: the crate's whole wire
//! code, kept small and property-tested over random reply bytes (`query::property`).
//!
//! The exchange is written here rather than taken from an SNTP crate because the error bound
//! needs the reply's root delay and root dispersion, which `rsntp` does not expose.
//!
//! One UDP socket per query, connected to the server so that only its datagrams are accepted.
//! The request's transmit timestamp is a random 64-bit nonce rather than the send time (as
//! RFC 9109 recommends and chrony does), so a reply's origin timestamp proves it answers this
//! request; the real send time T1 is kept locally, on the wall clock and on the carry clock
//! ([`Tick`]). A datagram whose origin timestamp is not the nonce is discarded and the wait
//! goes on until the timeout, so a stray or spoofed packet cannot fail the query.
//!
//! T4 − T1 is measured on the carry clock (immune to local clock steps and slewing during the
//! exchange); the server's T2 and T3 are converted from NTP timestamps to Unix time and
//! subtracted from T1 as exact integer nanoseconds before anything becomes an `f64`.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::net::UdpSocket;

use crate::{clock::Tick, combine::Span};

/// Why one server's reply was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplyError {
    /// A kiss-of-death reply (stratum 0): the server refused to serve us, with its 4-letter code
    /// (`RATE`, `DENY`, …).
    KissOfDeath {
        /// The kiss code from the reference id field.
        code: String,
    },
    /// The server's stratum is 16 or more: it is not synchronized.
    Stratum {
        /// The stratum in the reply.
        stratum: u8,
    },
    /// The leap indicator is 3 (alarm): the server's clock is not synchronized.
    Unsynchronized,
    /// The reply's root distance (round trip / 2 + root delay / 2 + root dispersion) exceeds
    /// the maximum acceptable error.
    RootDistance {
        /// The reply's root distance.
        distance: Duration,
        /// The configured maximum acceptable error.
        max: Duration,
    },
    /// The reply is not a well-formed answer to our query (too short, wrong mode or version,
    /// a zero transmit timestamp…). A datagram too short or in the wrong mode or version, or
    /// whose origin timestamp does not echo our request, is not an answer to it: it is
    /// discarded and the wait for the real reply goes on; this error then reports the first
    /// such malformed datagram when no answer came within the timeout.
    Malformed {
        /// What was wrong.
        reason: String,
    },
    /// No reply to our request within the timeout (datagrams that did not echo it were
    /// discarded).
    Timeout {
        /// The configured timeout.
        after: Duration,
    },
    /// The server could not be resolved or reached.
    Unreachable {
        /// The resolver's or socket's error.
        reason: String,
    },
    /// The server answered well, but its interval disagrees with the majority's.
    Falseticker,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::KissOfDeath { code } => write!(f, "kiss-of-death {code:?}"),
            ReplyError::Stratum { stratum } => {
                write!(f, "stratum {stratum}: the server is not synchronized")
            }
            ReplyError::Unsynchronized => {
                write!(
                    f,
                    "leap indicator 3: the server's clock is not synchronized"
                )
            }
            ReplyError::RootDistance { distance, max } => write!(
                f,
                "root distance {distance:?} is too large: the maximum acceptable error is {max:?}"
            ),
            ReplyError::Malformed { reason } => write!(f, "malformed reply: {reason}"),
            ReplyError::Timeout { after } => write!(f, "no reply within {after:?}"),
            ReplyError::Unreachable { reason } => write!(f, "unreachable: {reason}"),
            ReplyError::Falseticker => {
                write!(
                    f,
                    "falseticker: its interval disagrees with the other servers'"
                )
            }
        }
    }
}

impl std::error::Error for ReplyError {}

/// One good reply.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub span: Span,
    pub offset: f64,
    pub round_trip: Duration,
    pub root_delay: Duration,
    pub root_dispersion: Duration,
    pub stratum: u8,
    pub reference_id: String,
    /// The leap indicator: 0, or 1 / 2 for a second inserted / deleted at the end of the day.
    pub leap: u8,
}

fn unreachable(e: impl fmt::Display) -> ReplyError {
    ReplyError::Unreachable {
        reason: e.to_string(),
    }
}

fn malformed(reason: impl Into<String>) -> ReplyError {
    ReplyError::Malformed {
        reason: reason.into(),
    }
}

/// The length of an NTP packet without extension fields or MAC.
const PACKET_LEN: usize = 48;

/// Seconds from the NTP prime epoch (1900-01-01) to the Unix epoch (1970-01-01).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// An NTP timestamp (seconds since 1900 in 32.32 fixed point) as a wall-clock time.
///
/// Era 0 (1900–2036) is assumed, except that a timestamp whose top bit is clear is read as
/// era 1 (from 2036-02-07T06:28:16Z), as RFC 4330 §3 prescribes: that covers 1968–2104, and
/// agrees with plain era 0 on every timestamp from 1968 to 2036.
fn from_ntp(ts: u64) -> SystemTime {
    let secs = ts >> 32;
    let era = if secs & 0x8000_0000 == 0 {
        1u64 << 32
    } else {
        0
    };
    // The fraction to nanoseconds, rounded to nearest (2^-32 s is about 0.23 ns).
    let nanos = ((ts & 0xffff_ffff) * 1_000_000_000 + (1 << 31)) >> 32;
    let ntp_ns = i128::from(secs + era) * 1_000_000_000 + i128::from(nanos);
    let unix_ns = ntp_ns - i128::from(NTP_UNIX_OFFSET) * 1_000_000_000;
    // Every such time is within 1968..2105, so both conversions are exact and in range.
    let d = Duration::from_nanos(unix_ns.unsigned_abs() as u64);
    if unix_ns >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

/// `a − b` in nanoseconds (exact, signed).
fn diff_ns(a: SystemTime, b: SystemTime) -> i128 {
    match a.duration_since(b) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// NTP short format (16.16 fixed point, seconds) to a Duration, rounded up.
fn short_format(bytes: [u8; 4]) -> Duration {
    let v = u64::from(u32::from_be_bytes(bytes));
    Duration::from_nanos((v * 1_000_000_000).div_ceil(1 << 16))
}

fn word(p: &[u8], at: usize) -> [u8; 4] {
    p[at..at + 4].try_into().expect("4 bytes")
}

fn timestamp(p: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(p[at..at + 8].try_into().expect("8 bytes"))
}

/// A kiss code (or a stratum-1 reference id): four ASCII characters, NUL-padded. Anything
/// unprintable is escaped rather than trusted.
fn ascii_code(raw: [u8; 4]) -> String {
    let end = raw.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    raw[..end]
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

/// The reference id as people read it: the 4-letter source code for stratum 1, the upstream
/// server's IPv4 address for an IPv4 server above stratum 1, else (an IPv6 server's upstream,
/// hashed) the 32 bits in hex.
fn reference_id(raw: [u8; 4], stratum: u8, server: SocketAddr) -> String {
    match stratum {
        1 => ascii_code(raw),
        _ if server.is_ipv4() => Ipv4Addr::from(raw).to_string(),
        _ => format!("{:#010X}", u32::from_be_bytes(raw)),
    }
}

/// The request: LI 0, VN 4, mode 3 (client), everything zero but the transmit timestamp,
/// which carries `nonce`.
fn request(nonce: u64) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0] = 4 << 3 | 3;
    p[40..48].copy_from_slice(&nonce.to_be_bytes());
    p
}

/// Whether `reply` is addressed to the request carrying `nonce`. A reply too short to say, or
/// in the wrong mode or version, is an error (checked in that order); one that echoes another
/// origin is `false`. Either way the query discards it and keeps waiting.
pub(crate) fn addressed(reply: &[u8], nonce: u64) -> Result<bool, ReplyError> {
    if reply.len() < PACKET_LEN {
        return Err(malformed(format!(
            "{} bytes, shorter than the {PACKET_LEN} of an NTP packet",
            reply.len()
        )));
    }
    let mode = reply[0] & 7;
    if mode != 4 {
        return Err(malformed(format!("mode {mode}, not 4 (server)")));
    }
    let version = (reply[0] >> 3) & 7;
    if !(3..=4).contains(&version) {
        return Err(malformed(format!("version {version}, not 3 or 4")));
    }
    Ok(timestamp(reply, 24) == nonce)
}

/// The local side of one exchange.
pub(crate) struct Sent {
    /// T1 on the wall clock.
    pub t1: SystemTime,
    /// T4 − T1, on the carry clock.
    pub elapsed: Duration,
    /// The carry-clock tick of T4.
    pub received: Tick,
}

/// Checks a reply that echoes our nonce and turns it into a sample. `drift_ppm` bounds how far
/// the carry clock that measured T4 − T1 may be off over the exchange.
pub(crate) fn sample(
    reply: &[u8],
    sent: &Sent,
    server: SocketAddr,
    max_error: Duration,
    drift_ppm: f64,
) -> Result<Sample, ReplyError> {
    let leap = reply[0] >> 6;
    let stratum = reply[1];
    let refid = word(reply, 12);
    if stratum == 0 {
        return Err(ReplyError::KissOfDeath {
            code: ascii_code(refid),
        });
    }
    if stratum >= 16 {
        return Err(ReplyError::Stratum { stratum });
    }
    if leap == 3 {
        return Err(ReplyError::Unsynchronized);
    }
    let (t2, t3) = (timestamp(reply, 32), timestamp(reply, 40));
    if t3 == 0 {
        return Err(malformed("the transmit timestamp is zero"));
    }
    if t2 == 0 {
        return Err(malformed("the receive timestamp is zero"));
    }
    let (t2, t3) = (from_ntp(t2), from_ntp(t3));
    let root_delay = short_format(word(reply, 4));
    let root_dispersion = short_format(word(reply, 8));

    // Everything in exact integer nanoseconds: an f64 of T2 − T1 loses hundreds of
    // nanoseconds when the local wall clock is years off (a machine that booted in 1970).
    let t21 = diff_ns(t2, sent.t1);
    let t31 = diff_ns(t3, sent.t1);
    let t32 = diff_ns(t3, t2);
    let t41 = sent.elapsed.as_nanos() as i128;
    // ((T2−T1)+(T3−T4))/2, for the report only.
    let offset = (t21 + t31 - t41) as f64 / 2e9;
    // A slightly negative round trip (the server's processing time measured on its clock
    // exceeding ours) is clamped to zero, as RFC 5905 clamps the delay to be non-negative.
    let rtt = (t41 - t32).max(0);
    let round_trip = Duration::from_nanos(u64::try_from(rtt).unwrap_or(u64::MAX));
    let distance = round_trip / 2 + root_delay / 2 + root_dispersion;
    if distance > max_error {
        return Err(ReplyError::RootDistance {
            distance,
            max: max_error,
        });
    }
    // True time at T4 lies in [T3, T2 + (T4 − T1)], each end moved out by the server's root
    // distance: T1 cancels out, so the local wall clock does not matter. Exact nanoseconds:
    // T2 and T3 are each within ½ ns of the timestamps sent, hence the 1 ns outwards; the
    // root delay is halved rounding up; the upper end allows for the carry clock having
    // measured T4 − T1 short by the drift. With a negative round trip (clamped to zero above)
    // the bounds cross, and the interval is the midpoint ± the root distance instead.
    let (t2, t3) = (diff_ns(t2, UNIX_EPOCH), diff_ns(t3, UNIX_EPOCH));
    let sum = t2 + t3 + t41;
    let (mid_down, mid_up) = (sum.div_euclid(2), sum.div_euclid(2) + sum.rem_euclid(2));
    let root = (root_delay.as_nanos() as i128 + 1) / 2 + root_dispersion.as_nanos() as i128;
    let drift = crate::combine::drift_ns(sent.elapsed, drift_ppm);
    let span = Span {
        at: sent.received,
        lo: t3.min(mid_down) - root - 1,
        hi: (t2 + t41).max(mid_up) + root + 1 + drift,
    };
    Ok(Sample {
        span,
        offset,
        round_trip,
        root_delay,
        root_dispersion,
        stratum,
        reference_id: reference_id(refid, stratum, server),
        leap,
    })
}

/// Queries `addr` once, timing the exchange on `clock` (the carry clock; a test may shift it);
/// `queries` counts the requests actually sent to the server.
///
/// A datagram that is not a well-formed answer to this request (too short, wrong mode or
/// version, or echoing another origin) is discarded and the wait goes on: only a reply that
/// echoes the nonce settles the query. If the timeout passes after a malformed datagram, the
/// query fails as [`ReplyError::Malformed`] with the first one's reason.
pub(crate) async fn query(
    addr: SocketAddr,
    timeout: Duration,
    max_error: Duration,
    drift_ppm: f64,
    clock: fn() -> Tick,
    queries: &AtomicU64,
) -> Result<Sample, ReplyError> {
    let socket = if addr.is_ipv4() {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await
    } else {
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).await
    }
    .map_err(unreachable)?;
    socket.connect(addr).await.map_err(unreachable)?;

    // Zero is what "no origin" looks like in a reply; never use it as the nonce.
    let nonce = rand::random::<u64>().max(1);
    let deadline = tokio::time::Instant::now() + timeout;
    let t1 = SystemTime::now();
    let sent_at = clock();
    socket.send(&request(nonce)).await.map_err(unreachable)?;
    queries.fetch_add(1, Ordering::Relaxed);

    let mut first_malformed: Option<ReplyError> = None;
    let exchange = async {
        // Room for extension fields and a MAC, which are ignored.
        let mut buf = [0u8; 1024];
        loop {
            let n = socket.recv(&mut buf).await.map_err(unreachable)?;
            let received = clock();
            let reply = &buf[..n];
            match addressed(reply, nonce) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(
                        server = %addr,
                        "discarded an NTP reply whose origin timestamp does not echo our request"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::debug!(server = %addr, error = %e, "discarded a malformed NTP datagram");
                    first_malformed.get_or_insert(e);
                    continue;
                }
            }
            let sent = Sent {
                t1,
                elapsed: received.saturating_duration_since(sent_at),
                received,
            };
            return sample(reply, &sent, addr, max_error, drift_ppm);
        }
    };
    let outcome = tokio::time::timeout_at(deadline, exchange).await;
    match outcome {
        Ok(result) => result,
        Err(_) => Err(first_malformed.unwrap_or(ReplyError::Timeout { after: timeout })),
    }
}

#[cfg(test)]
mod property;

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Instant;

    use super::*;

    /// A wall-clock time as an NTP timestamp (the inverse of `from_ntp`, truncating).
    pub(crate) fn to_ntp(t: SystemTime) -> u64 {
        let ns = diff_ns(t, UNIX_EPOCH) + i128::from(NTP_UNIX_OFFSET) * 1_000_000_000;
        let (secs, nanos) = (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000));
        let frac = ((nanos as u64) << 32) / 1_000_000_000;
        ((secs as u64 & 0xffff_ffff) << 32) | frac
    }

    pub(crate) fn unix(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn known_timestamps() {
        // The Unix epoch: 2 208 988 800 s after 1900.
        assert_eq!(from_ntp(0x83AA_7E80_0000_0000), UNIX_EPOCH);
        // 2000-01-01T00:00:00.5Z: 3 155 673 600 s after 1900, half a second of fraction.
        assert_eq!(
            from_ntp(0xBC17_C200_8000_0000),
            unix(946_684_800, 500_000_000)
        );
        // 2024-01-01T00:00:00.25Z (1 704 067 200 Unix): 3 913 056 000 = 0xE93C_7F00.
        assert_eq!(
            from_ntp(0xE93C_7F00_4000_0000),
            unix(1_704_067_200, 250_000_000)
        );
        // The last second of era 0, and era 1's first (2036-02-07T06:28:16Z).
        assert_eq!(from_ntp(0xFFFF_FFFF_0000_0000), unix(2_085_978_495, 0));
        assert_eq!(from_ntp(0), unix(2_085_978_496, 0));
        // 1 ns is 4.29 fraction units; the fraction rounds to the nearest nanosecond.
        assert_eq!(from_ntp(0x83AA_7E80_0000_0004), unix(0, 1));
        // Before the Unix epoch (the top bit still set: era 0).
        assert_eq!(
            from_ntp(0x83AA_7E7F_0000_0000),
            UNIX_EPOCH - Duration::from_secs(1)
        );
    }

    #[test]
    fn system_time_to_ntp_and_back() {
        assert_eq!(to_ntp(UNIX_EPOCH), 0x83AA_7E80_0000_0000);
        assert_eq!(
            to_ntp(unix(946_684_800, 500_000_000)),
            0xBC17_C200_8000_0000
        );
        for t in [
            SystemTime::now(),
            unix(1_704_067_200, 123_456_789),
            unix(2_085_978_495, 999_999_999),
            unix(2_085_978_496, 1),
            unix(4_000_000_000, 42),
        ] {
            let back = from_ntp(to_ntp(t));
            assert!(diff_ns(back, t).abs() <= 1, "{t:?} -> {back:?}");
        }
    }

    #[test]
    fn short_format_rounds_up() {
        assert_eq!(short_format([0, 1, 0, 0]), Duration::from_secs(1));
        assert_eq!(short_format([0, 0, 0x80, 0]), Duration::from_millis(500));
        assert_eq!(short_format([0, 0, 0, 1]), Duration::from_nanos(15_259));
    }

    #[test]
    fn request_is_an_sntp_v4_client_packet_carrying_the_nonce() {
        let p = request(0x0123_4567_89AB_CDEF);
        assert_eq!(p[0], 0b00_100_011);
        assert!(p[1..40].iter().all(|&b| b == 0));
        assert_eq!(timestamp(&p, 40), 0x0123_4567_89AB_CDEF);
    }

    /// A good stratum-2 reply to `nonce`, the server `server_minus_local` ahead of T1's clock.
    pub(crate) fn reply(
        nonce: u64,
        server_minus_local: Duration,
        t1: SystemTime,
    ) -> [u8; PACKET_LEN] {
        let mut p = [0u8; PACKET_LEN];
        p[0] = 4 << 3 | 4;
        p[1] = 2;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[24..32].copy_from_slice(&nonce.to_be_bytes());
        // The server receives 10 ms after T1 and answers 2 ms later (its clock ahead).
        let t2 = to_ntp(t1 + server_minus_local + Duration::from_millis(10));
        let t3 = to_ntp(t1 + server_minus_local + Duration::from_millis(12));
        p[32..40].copy_from_slice(&t2.to_be_bytes());
        p[40..48].copy_from_slice(&t3.to_be_bytes());
        p
    }

    #[test]
    fn offset_and_round_trip_from_the_four_timestamps() {
        let t1 = unix(1_704_067_200, 0);
        let received = Tick::now();
        // T4 = T1 + 22 ms: 10 ms out, 2 ms at the server, 10 ms back.
        let sent = Sent {
            t1,
            elapsed: Duration::from_millis(22),
            received,
        };
        let server = SocketAddr::from(([192, 0, 2, 1], 123));
        let p = reply(7, Duration::from_secs(3), t1);
        assert_eq!(addressed(&p, 7), Ok(true));
        assert_eq!(addressed(&p, 8), Ok(false));
        let s = sample(&p, &sent, server, Duration::from_secs(1), 0.0).unwrap();
        assert!((s.offset - 3.0).abs() < 1e-8, "{s:?}");
        assert!(
            s.round_trip.abs_diff(Duration::from_millis(20)) <= Duration::from_nanos(2),
            "{s:?}"
        );
        assert_eq!(s.reference_id, "10.0.0.1");
        // The span is centred on the server's time at T4, ± half the round trip.
        let t4_server = diff_ns(t1, UNIX_EPOCH) + 3_022_000_000;
        assert!((s.span.lo + s.span.hi - 2 * t4_server).abs() <= 4, "{s:?}");
        assert!(s.span.half_width() >= Duration::from_millis(10), "{s:?}");
        assert!(
            s.span.half_width() <= Duration::from_micros(10_001),
            "{s:?}"
        );
    }

    #[test]
    fn the_centre_is_exact_whatever_the_local_wall_clock_says() {
        // A machine that booted in 1970 asks a server in 2024: T2 − T1 is about 1.7e9 s, where
        // an f64 has a resolution of about 240 ns. The centre must still be exact.
        let t1 = unix(1, 0);
        let server_t2 = unix(1_704_067_200, 123_456_789);
        let mut p = [0u8; PACKET_LEN];
        p[0] = 4 << 3 | 4;
        p[1] = 2;
        p[24..32].copy_from_slice(&7u64.to_be_bytes());
        p[32..40].copy_from_slice(&to_ntp(server_t2).to_be_bytes());
        let server_t3 = server_t2 + Duration::from_millis(2);
        p[40..48].copy_from_slice(&to_ntp(server_t3).to_be_bytes());
        let sent = Sent {
            t1,
            elapsed: Duration::from_millis(22),
            received: Tick::now(),
        };
        let server = SocketAddr::from(([192, 0, 2, 1], 123));
        let s = sample(&p, &sent, server, Duration::from_secs(1), 0.0).unwrap();
        // True time at T4 is in [T3, T2 + 22 ms]: centred on T3 + 10 ms, ± 10 ms.
        let t3 = diff_ns(from_ntp(to_ntp(server_t3)), UNIX_EPOCH);
        let t2 = diff_ns(from_ntp(to_ntp(server_t2)), UNIX_EPOCH);
        assert!(s.span.lo <= t3 && s.span.hi >= t2 + 22_000_000, "{s:?}");
        assert!(
            (s.span.lo + s.span.hi - 2 * (t3 + 10_000_000)).abs() <= 2,
            "{s:?}"
        );
        assert!(
            s.span.half_width() <= Duration::from_nanos(10_000_004),
            "{s:?}"
        );
    }

    #[test]
    fn the_error_allows_for_drift_over_the_exchange() {
        let t1 = unix(1_704_067_200, 0);
        let sent = Sent {
            t1,
            elapsed: Duration::from_millis(22),
            received: Tick::now(),
        };
        let server = SocketAddr::from(([192, 0, 2, 1], 123));
        let p = reply(7, Duration::ZERO, t1);
        let s = sample(&p, &sent, server, Duration::from_secs(1), 500.0).unwrap();
        // 500 ppm of the 22 ms measured on the carry clock: the round trip may have been
        // 11 µs longer, so the upper end (T2 + 22 ms + root distance) moves out by that much.
        let t2 = diff_ns(from_ntp(timestamp(&p, 32)), UNIX_EPOCH);
        assert!(s.span.hi >= t2 + 22_000_000 + 11_000, "{s:?}");
        assert!(s.span.hi <= t2 + 22_000_000 + 11_002, "{s:?}");
    }

    /// A server on loopback that answers each request with `before` datagrams, then `answer`.
    async fn server(
        before: Vec<Vec<u8>>,
        answer: bool,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = socket.recv_from(&mut buf).await.unwrap();
            assert_eq!(n, PACKET_LEN);
            let nonce = timestamp(&buf, 40);
            for datagram in before {
                socket.send_to(&datagram, from).await.unwrap();
            }
            if answer {
                let good = reply(nonce, Duration::ZERO, SystemTime::now());
                socket.send_to(&good, from).await.unwrap();
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_malformed_datagram_is_discarded_and_reported_only_if_no_answer_comes() {
        let good = reply(1, Duration::ZERO, SystemTime::now());
        let mut wrong_mode = good;
        wrong_mode[0] = 4 << 3 | 3;
        let junk = vec![good[..20].to_vec(), wrong_mode.to_vec()];
        let counter = AtomicU64::new(0);
        let timeout = Duration::from_millis(300);

        // A short datagram and a mode-3 one before the real answer: the answer is used.
        let (addr, task) = server(junk.clone(), true).await;
        let s = query(
            addr,
            timeout,
            Duration::from_secs(1),
            15.0,
            Tick::now,
            &counter,
        )
        .await;
        assert!(s.is_ok(), "{s:?}");
        task.await.unwrap();

        // The same without an answer: the first malformed datagram's reason, at the timeout.
        let (addr, task) = server(junk, false).await;
        let start = Instant::now();
        let e = query(
            addr,
            timeout,
            Duration::from_secs(1),
            15.0,
            Tick::now,
            &counter,
        )
        .await
        .unwrap_err();
        assert!(start.elapsed() >= timeout);
        assert!(
            matches!(&e, ReplyError::Malformed { reason } if reason.contains("20 bytes")),
            "{e:?}"
        );
        task.await.unwrap();
        assert_eq!(counter.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn replies_are_checked_in_order() {
        let t1 = SystemTime::now();
        let good = reply(7, Duration::ZERO, t1);
        let reason = |r: Result<bool, ReplyError>| match r {
            Err(ReplyError::Malformed { reason }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(reason(addressed(&good[..47], 7)).contains("47 bytes"));
        let mut p = good;
        p[0] = 4 << 3 | 3;
        assert_eq!(reason(addressed(&p, 7)), "mode 3, not 4 (server)");
        p[0] = 2 << 3 | 4;
        assert_eq!(reason(addressed(&p, 7)), "version 2, not 3 or 4");
        p[0] = 3 << 3 | 4;
        assert_eq!(addressed(&p, 7), Ok(true));

        let sent = Sent {
            t1,
            elapsed: Duration::from_millis(22),
            received: Tick::now(),
        };
        let server = SocketAddr::from(([192, 0, 2, 1], 123));
        let check = |p: &[u8]| sample(p, &sent, server, Duration::from_secs(1), 0.0);
        let mut p = good;
        p[1] = 0;
        p[12..16].copy_from_slice(b"RATE");
        p[0] |= 3 << 6;
        assert_eq!(
            check(&p).unwrap_err(),
            ReplyError::KissOfDeath {
                code: "RATE".into()
            }
        );
        let mut p = good;
        p[1] = 16;
        p[0] |= 3 << 6;
        assert_eq!(check(&p).unwrap_err(), ReplyError::Stratum { stratum: 16 });
        p[1] = 2;
        assert_eq!(check(&p).unwrap_err(), ReplyError::Unsynchronized);
        let mut p = good;
        p[40..48].fill(0);
        assert!(
            matches!(check(&p), Err(ReplyError::Malformed { reason }) if reason.contains("transmit"))
        );
        let mut p = good;
        p[8..12].copy_from_slice(&[0, 1, 0, 0]);
        assert!(matches!(check(&p), Err(ReplyError::RootDistance { .. })));
        assert!(check(&good).is_ok());
    }

    #[test]
    fn kiss_codes_and_reference_ids_are_printable() {
        let v4 = SocketAddr::from(([192, 0, 2, 1], 123));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 123));
        assert_eq!(ascii_code(*b"DENY"), "DENY");
        assert_eq!(ascii_code(*b"GPS\0"), "GPS");
        assert_eq!(ascii_code([b'X', 0x07, b'"', 0]), "X\\x07\\\"");
        assert_eq!(reference_id(*b"PPS\0", 1, v4), "PPS");
        assert_eq!(reference_id([127, 0, 0, 1], 3, v4), "127.0.0.1");
        assert_eq!(reference_id([0xDE, 0xAD, 0xBE, 0xEF], 3, v6), "0xDEADBEEF");
    }
}
