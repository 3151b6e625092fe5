//! `rediss://` against private redis-servers serving only TLS, with certificates the test makes
//! (rcgen): a server verified through `ca_file`, a server signed by another CA refused, and
//! mutual TLS with and without a client certificate. Needs `redis-server` on the PATH (built
//! with TLS, as Debian's is) and the `tls` feature; gated on `SYNC_TEST_REDIS` like the other
//! live tests (`cargo xtask test` runs it).

mod common;

use std::{process::Child, time::Duration};

use common::{TestFn, TestResult, err};
use sync_conformance::pki::Pki;
use sync_core::{Backend, ErrorKind, LockOptions};
use sync_redis::{Client, Config};
use tokio::time::Instant;

/// A redis-server serving only TLS on a free port; killed on drop.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsRedis {
    fn start(pki: &Pki, mutual: bool) -> Result<TlsRedis, String> {
        let port = common::free_port()?;
        let (server, key, ca) = (
            pki.path("server.pem"),
            pki.path("server-key.pem"),
            pki.path("ca.pem"),
        );
        let args = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &server,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            if mutual { "yes" } else { "no" },
        ];
        let child = common::redis_server(&args, &pki.dir)?;
        Ok(TlsRedis { child, port })
    }

    /// Waits (bounded) until the port accepts connections.
    async fn ready(&self) -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("the TLS redis-server did not listen within 20s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn url(&self, query: &str) -> String {
        format!("rediss://127.0.0.1:{}/tls-test?{query}", self.port)
    }
}

fn file_query(pki: &Pki, key: &str, name: &str) -> String {
    format!(
        "{key}={}",
        pki.path(name).replace('%', "%25").replace('/', "%2F")
    )
}

async fn lock_once(url: &str) -> sync_core::Result<()> {
    let client = Client::connect(Config::from_url(url)?).await?;
    client
        .lock()?
        .acquire("tls", LockOptions::new())
        .await?
        .release()
        .await?;
    client.close().await
}

/// A server whose certificate `ca_file` signed: locks work over TLS.
async fn verified_by_ca_file() -> TestResult {
    let pki = Pki::new()?;
    let redis = TlsRedis::start(&pki, false)?;
    redis.ready().await?;
    lock_once(&redis.url(&file_query(&pki, "ca_file", "ca.pem")))
        .await
        .map_err(err)
}

/// A server signed by a CA the client does not trust is refused: InvalidArgument (a setup
/// mistake), not Unavailable.
async fn untrusted_server_is_refused() -> TestResult {
    let pki = Pki::new()?;
    let redis = TlsRedis::start(&pki, false)?;
    redis.ready().await?;
    let url = redis.url(&file_query(&pki, "ca_file", "other-ca.pem"));
    match lock_once(&url).await {
        Err(e) if e.kind() == ErrorKind::InvalidArgument => Ok(()),
        Err(e) => Err(format!("an untrusted server gave {:?}: {e}", e.kind())),
        Ok(()) => Err("a server signed by an untrusted CA was accepted".into()),
    }
}

/// Mutual TLS: with the client certificate locks work; without one the server refuses it
/// (Unauthorized).
async fn mutual_tls() -> TestResult {
    let pki = Pki::new()?;
    let redis = TlsRedis::start(&pki, true)?;
    redis.ready().await?;
    let ca = file_query(&pki, "ca_file", "ca.pem");
    let with_cert = format!(
        "{ca}&{}&{}",
        file_query(&pki, "cert_file", "client.pem"),
        file_query(&pki, "key_file", "client-key.pem")
    );
    lock_once(&redis.url(&with_cert)).await.map_err(err)?;
    let without = Config::from_url(&redis.url(&ca))
        .map_err(err)?
        .with_request_timeout(Duration::from_secs(2));
    match Client::connect(without).await {
        Err(e) if e.kind() == ErrorKind::Unauthorized => Ok(()),
        Err(e) => Err(format!("no client certificate gave {:?}: {e}", e.kind())),
        Ok(_) => Err("a client without a certificate was let in".into()),
    }
}

fn main() -> std::process::ExitCode {
    let tests: [(&'static str, TestFn); 3] = [
        ("tls::verified_by_ca_file", |_| {
            Box::pin(verified_by_ca_file())
        }),
        ("tls::untrusted_server_is_refused", |_| {
            Box::pin(untrusted_server_is_refused())
        }),
        ("tls::mutual_tls", |_| Box::pin(mutual_tls())),
    ];
    common::run(&tests)
}
