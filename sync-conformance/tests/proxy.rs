//! The fault proxy's hold, against a tiny echo server on loopback: the chunk that completes
//! the pattern is held (and nothing after it on that connection), the rest flows, and a
//! release lets it through and disarms.

use std::{net::SocketAddr, time::Duration};

use sync_conformance::proxy::{Fault, FaultProxy};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

const SOON: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

/// An echo server on a free loopback port.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A client connected to the echo server through a new proxy.
async fn proxied() -> (FaultProxy, TcpStream) {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let conn = TcpStream::connect(proxy.addr()).await.unwrap();
    conn.set_nodelay(true).unwrap();
    (proxy, conn)
}

/// Sends `bytes` and expects them echoed back within [`SOON`].
async fn round_trip(conn: &mut TcpStream, bytes: &[u8]) {
    conn.write_all(bytes).await.unwrap();
    expect_echo(conn, bytes).await;
}

async fn expect_echo(conn: &mut TcpStream, bytes: &[u8]) {
    let mut got = vec![0u8; bytes.len()];
    timeout(SOON, conn.read_exact(&mut got))
        .await
        .expect("no echo in time")
        .unwrap();
    assert_eq!(got, bytes);
}

/// Nothing comes back for [`QUIET`].
async fn expect_silence(conn: &mut TcpStream) {
    let mut byte = [0u8; 1];
    let read = timeout(QUIET, conn.read(&mut byte)).await;
    assert!(read.is_err(), "something came back: {read:?}");
}

#[tokio::test]
async fn holds_the_chunk_with_the_pattern_until_released() {
    let (proxy, mut conn) = proxied().await;
    proxy.hold_next(b"secret".as_slice());
    round_trip(&mut conn, b"hello").await;
    conn.write_all(b"xx-secret-yy").await.unwrap();
    timeout(SOON, proxy.held()).await.expect("not held");
    expect_silence(&mut conn).await;
    // What follows on the held connection waits behind the held chunk.
    conn.write_all(b"after").await.unwrap();
    expect_silence(&mut conn).await;
    proxy.release();
    expect_echo(&mut conn, b"xx-secret-yyafter").await;
    // Released means disarmed: the pattern passes from now on.
    round_trip(&mut conn, b"secret").await;
}

#[tokio::test]
async fn a_pattern_split_across_reads_is_held_at_the_chunk_that_completes_it() {
    let (proxy, mut conn) = proxied().await;
    proxy.hold_next(b"secret".as_slice());
    round_trip(&mut conn, b"..sec").await;
    conn.write_all(b"ret..").await.unwrap();
    timeout(SOON, proxy.held()).await.expect("not held");
    expect_silence(&mut conn).await;
    proxy.release();
    expect_echo(&mut conn, b"ret..").await;
}

#[tokio::test]
async fn only_the_matching_connection_is_held() {
    let (proxy, mut held) = proxied().await;
    let mut other = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.hold_next(b"key".as_slice());
    held.write_all(b"key").await.unwrap();
    timeout(SOON, proxy.held()).await.expect("not held");
    // The hold is taken: the same pattern on another connection flows.
    round_trip(&mut other, b"key").await;
    expect_silence(&mut held).await;
    proxy.release();
    expect_echo(&mut held, b"key").await;
}

#[tokio::test]
async fn a_released_chunk_meets_the_fault_set_meanwhile() {
    let (proxy, mut conn) = proxied().await;
    proxy.hold_next(b"ask".as_slice());
    conn.write_all(b"ask").await.unwrap();
    timeout(SOON, proxy.held()).await.expect("not held");
    proxy.set(Fault::DropResponses);
    proxy.release();
    expect_silence(&mut conn).await;
    proxy.set(Fault::Pass);
    round_trip(&mut conn, b"again").await;
}

#[tokio::test]
async fn release_before_the_pattern_is_seen_disarms() {
    let (proxy, mut conn) = proxied().await;
    proxy.hold_next(b"never".as_slice());
    proxy.release();
    round_trip(&mut conn, b"never").await;
}
