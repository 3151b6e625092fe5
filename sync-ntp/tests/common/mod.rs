//! A tiny NTP responder for tests: answers each query with a crafted 48-byte packet and counts
//! the queries it received.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{net::UdpSocket, sync::watch, task::JoinHandle};

/// What the responder sends back.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A good stratum-2 reply whose clock is `offset_ms` ahead of ours, with this root
    /// dispersion (µs).
    Good { offset_ms: i64, dispersion_us: u32 },
    /// Stratum 0 with a kiss code in the reference id.
    Kiss(&'static str),
    /// Stratum 16 (unsynchronized).
    Stratum16,
    /// Leap indicator 3 (alarm).
    Leap3,
    /// A good reply but with this root dispersion in seconds (a huge root distance).
    RootDispersionSecs(u16),
    /// Only the first 40 bytes.
    Short,
    /// Mode 3 (client) instead of 4 (server).
    WrongMode,
    /// Version 2 instead of 4.
    WrongVersion,
    /// A zero transmit timestamp.
    ZeroTransmit,
    /// An origin timestamp that is not the query's transmit timestamp.
    WrongOrigin,
    /// First a stray datagram (an origin timestamp that is not the query's), then, a little
    /// later, a good reply.
    StrayThenGood,
    /// No answer at all.
    Silent,
    /// A good reply whose receive timestamp is a second before its transmit timestamp (so the
    /// round trip comes out negative and counts as zero), with this raw 16.16 root dispersion:
    /// the root distance is exactly the dispersion.
    SlowServer { dispersion_raw: u32 },
    /// A good reply (20 ms root dispersion) from a server whose clock, counting every second,
    /// is `offset_ms` ahead of ours, announcing a leap second at the Unix time `midnight`:
    /// `indicator` 1 inserts a second before it, 2 deletes 23:59:59. The server applies it:
    /// once its clock passes the leap it answers in post-leap time, with indicator 0.
    Leap {
        indicator: u8,
        offset_ms: i64,
        midnight: u64,
    },
}

impl Reply {
    pub fn good() -> Reply {
        Reply::Good {
            offset_ms: 0,
            dispersion_us: 100,
        }
    }
}

pub struct Responder {
    pub addr: SocketAddr,
    /// The queries received so far; watched, so that a test can await the next one.
    queries: Arc<watch::Sender<u64>>,
    reply: Arc<Mutex<Reply>>,
    task: JoinHandle<()>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ntp_timestamp(t: SystemTime, offset_ms: i64) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    let d = if offset_ms >= 0 {
        d + Duration::from_millis(offset_ms as u64)
    } else {
        d - Duration::from_millis((-offset_ms) as u64)
    };
    let secs = (d.as_secs() + 2_208_988_800) & 0xffff_ffff;
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// The 48-byte reply to `query` (or None to stay silent).
pub fn craft(reply: &Reply, query: &[u8]) -> Option<Vec<u8>> {
    let mut origin = [0u8; 8];
    if query.len() >= 48 {
        origin.copy_from_slice(&query[40..48]);
    }
    let (mut li, mut version, mut mode, mut stratum) = (0u8, 4u8, 4u8, 2u8);
    let mut refid = [127, 0, 0, 1];
    let mut dispersion: u32 = 0;
    let mut offset_ms = 0;
    match reply {
        Reply::Good {
            offset_ms: o,
            dispersion_us,
        } => {
            offset_ms = *o;
            dispersion = ((u64::from(*dispersion_us) << 16) / 1_000_000) as u32;
        }
        Reply::Kiss(code) => {
            stratum = 0;
            refid.copy_from_slice(&code.as_bytes()[..4]);
        }
        Reply::Leap {
            indicator,
            offset_ms: o,
            midnight,
        } => {
            dispersion = ((20_000u64 << 16) / 1_000_000) as u32;
            let counted_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64
                + o;
            let midnight_ms = *midnight as i64 * 1_000;
            (offset_ms, li) = match indicator {
                1 if counted_ms >= midnight_ms => (o - 1_000, 0),
                2 if counted_ms >= midnight_ms - 1_000 => (o + 1_000, 0),
                _ => (*o, *indicator),
            };
        }
        Reply::Stratum16 => stratum = 16,
        Reply::Leap3 => li = 3,
        Reply::RootDispersionSecs(s) => dispersion = u32::from(*s) << 16,
        Reply::SlowServer { dispersion_raw } => dispersion = *dispersion_raw,
        Reply::WrongOrigin => origin = 0x0123_4567_89ab_cdef_u64.to_be_bytes(),
        Reply::WrongVersion => version = 2,
        Reply::WrongMode => mode = 3,
        Reply::Short | Reply::ZeroTransmit | Reply::StrayThenGood => {}
        Reply::Silent => return None,
    }
    let now = ntp_timestamp(SystemTime::now(), offset_ms);
    let mut p = vec![0u8; 48];
    p[0] = (li << 6) | (version << 3) | mode;
    p[1] = stratum;
    p[2] = 6; // poll
    p[3] = (-20i8) as u8; // precision
    p[4..8].copy_from_slice(&0u32.to_be_bytes()); // root delay
    p[8..12].copy_from_slice(&dispersion.to_be_bytes());
    p[12..16].copy_from_slice(&refid);
    p[16..24].copy_from_slice(&now.to_be_bytes()); // reference
    p[24..32].copy_from_slice(&origin);
    let receive = match reply {
        Reply::SlowServer { .. } => now - (1 << 32),
        _ => now,
    };
    p[32..40].copy_from_slice(&receive.to_be_bytes()); // receive
    p[40..48].copy_from_slice(&now.to_be_bytes()); // transmit
    match reply {
        Reply::Short => p.truncate(40),
        Reply::ZeroTransmit => p[40..48].fill(0),
        _ => {}
    }
    Some(p)
}

impl Responder {
    pub async fn start(reply: Reply) -> Responder {
        Responder::start_on("127.0.0.1:0", reply).await
    }

    /// A responder bound to `bind` (e.g. `[::1]:0` for IPv6).
    pub async fn start_on(bind: &str, reply: Reply) -> Responder {
        let socket = UdpSocket::bind(bind).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let queries = Arc::new(watch::Sender::new(0));
        let reply = Arc::new(Mutex::new(reply));
        let task = tokio::spawn({
            let (queries, reply) = (queries.clone(), reply.clone());
            async move {
                let mut buf = [0u8; 512];
                loop {
                    let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                        continue;
                    };
                    queries.send_modify(|q| *q += 1);
                    let reply = reply.lock().unwrap().clone();
                    if reply == Reply::StrayThenGood {
                        let stray = craft(&Reply::WrongOrigin, &buf[..n]).unwrap();
                        let _ = socket.send_to(&stray, from).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if let Some(answer) = craft(&reply, &buf[..n]) {
                        let _ = socket.send_to(&answer, from).await;
                    }
                }
            }
        });
        Responder {
            addr,
            queries,
            reply,
            task,
        }
    }

    pub fn queries(&self) -> u64 {
        *self.queries.borrow()
    }

    /// Waits until at least `n` queries have arrived.
    pub async fn wait_for_queries(&self, n: u64) {
        let mut queries = self.queries.subscribe();
        queries
            .wait_for(|&q| q >= n)
            .await
            .expect("the responder owns the sender");
    }

    pub fn set(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    pub fn server(&self) -> String {
        self.addr.to_string()
    }
}
