//! sync-ntp's `now()` against one raw SNTP exchange per call and the host clock.

use std::{
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use sync_bench::{
    report::{Better, Report, Row, Sample},
    stats::{micros, quantile},
};
use sync_core::Backend;
use tokio::net::UdpSocket;

use crate::{Ctx, OrMsg, Result, scenario};

const B: &str = "ntp";

pub(crate) async fn run(ctx: Ctx, url: &str, report: &mut Report) {
    scenario(report, B, "Time now()", now(ctx, url.to_string())).await;
}

fn latency_sample(lat: &[Duration]) -> Sample {
    let us = micros(lat);
    Sample {
        value: quantile(&us, 0.5).unwrap_or(0.0),
        p99: quantile(&us, 0.99),
        ..Sample::default()
    }
}

/// The server's address from an `ntp://host:port,…` URL (the first one).
fn server(url: &str) -> Result<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let first = rest.split([',', '/', '?']).next().unwrap_or(rest);
    let first = if first.contains(':') {
        first.to_string()
    } else {
        format!("{first}:123")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&first)
        .or_msg("resolving the NTP server")?
        .next()
        .ok_or_else(|| format!("{first}: no address"))
}

/// One SNTP client request (mode 3, version 4) and its answer: the least a client that asks
/// the server every time must do.
async fn sntp(socket: &UdpSocket) -> Result<()> {
    let mut req = [0u8; 48];
    req[0] = 0x23;
    socket.send(&req).await.or_msg("sending an SNTP request")?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
        .await
        .or_msg("SNTP answer")?
        .or_msg("receiving an SNTP answer")?;
    if n < 48 || buf[0] & 0x07 != 4 {
        return Err(format!("not an SNTP server answer ({n} bytes)"));
    }
    Ok(())
}

async fn now(ctx: Ctx, url: String) -> Result<Vec<Row>> {
    let calls = ctx.pick(200, 2000);
    let config = sync_ntp::Config::from_url(&url).or_msg("ntp url")?;
    let client = sync_ntp::Client::connect(config)
        .await
        .or_msg("connecting sync-ntp")?;
    let time = client.time().or_msg("time handle")?;
    // The first call syncs; the rows measure the steady state.
    time.now().await.or_msg("first now()")?;
    let socket = UdpSocket::bind("0.0.0.0:0").await.or_msg("udp socket")?;
    socket.connect(server(&url)?).await.or_msg("udp connect")?;
    let mut row = Row::new(B, "Time now()", "p50 µs", Better::Lower)
        .with_raw("one SNTP request/answer per call")
        .with_peer("SystemTime::now() (the unchecked host clock)")
        .with_note(format!("{calls} calls per round"));
    for _ in 0..ctx.rounds {
        let queries_before = client.queries();
        let mut lat = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            time.now().await.or_msg("now()")?;
            lat.push(t.elapsed());
        }
        let mut s = latency_sample(&lat);
        s.detail = format!("{} NTP queries", client.queries() - queries_before);
        row.sync.rounds.push(s);
        let mut lat = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            sntp(&socket).await?;
            lat.push(t.elapsed());
        }
        if let Some(raw) = row.raw.as_mut() {
            raw.rounds.push(latency_sample(&lat));
        }
        let mut lat = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            std::hint::black_box(SystemTime::now());
            lat.push(t.elapsed());
        }
        if let Some(peer) = row.peer.as_mut() {
            peer.rounds.push(latency_sample(&lat));
        }
    }
    client.close().await.or_msg("closing sync-ntp")?;
    Ok(vec![row.finish()])
}
