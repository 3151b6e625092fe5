//! `consuls://` against private Consul dev agents serving only HTTPS, with certificates the
//! test makes (rcgen): an agent verified through `ca_file`, one signed by another CA refused,
//! and mutual TLS with and without a client certificate. Needs the `consul` binary (found as
//! `common::consul_binary` says); gated on `SYNC_TEST_CONSUL` like the other live tests
//! (`cargo xtask test` runs it).

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use libtest_mimic::{Arguments, Trial};
use sync_conformance::pki::Pki;
use sync_consul::{Client, Config};
use sync_core::{Backend, ErrorKind, LockOptions};
use tokio::time::Instant;

mod common;

use common::{TestResult, err};

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(err)
}

/// A Consul dev agent serving only HTTPS on a free port; killed on drop.
struct TlsConsul {
    child: Child,
    port: u16,
}

impl Drop for TlsConsul {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsConsul {
    fn start(pki: &Pki, mutual: bool) -> Result<TlsConsul, String> {
        let [https, server, lan, wan] = [free_port()?, free_port()?, free_port()?, free_port()?];
        let config = format!(
            "ports {{\n  http = -1\n  https = {https}\n  dns = -1\n  grpc = -1\n  server = {server}\n  \
             serf_lan = {lan}\n  serf_wan = {wan}\n}}\nca_file = {:?}\ncert_file = {:?}\n\
             key_file = {:?}\nverify_incoming_https = {mutual}\n",
            pki.path("ca.pem"),
            pki.path("server.pem"),
            pki.path("server-key.pem"),
        );
        let name = if mutual { "mutual.hcl" } else { "tls.hcl" };
        pki.write(name, &config).map_err(err)?;
        let child = Command::new(common::consul_binary()?)
            .args(["agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1"])
            .arg(format!("-node=sync-tls-{https}"))
            .arg(format!("-config-file={}", pki.path(name)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting consul: {e}"))?;
        Ok(TlsConsul { child, port: https })
    }

    fn url(&self, pki: &Pki, extra: &str) -> String {
        format!(
            "consuls://127.0.0.1:{}/tls-{}?ca_file={}{extra}",
            self.port,
            uuid::Uuid::new_v4().simple(),
            pki.query("ca.pem")
        )
    }

    /// Waits (bounded) until a client with `url` connects (the agent elected itself).
    async fn ready(&self, url: &str) -> Result<Client, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(Config::from_url(url).map_err(err)?).await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("the TLS agent never answered: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// `url` is refused at connect with `kind` and a message containing every one of `words`.
async fn refused(url: &str, kind: ErrorKind, words: &[&str]) -> TestResult {
    let config = Config::from_url(url).map_err(err)?;
    match Client::connect(config).await {
        Ok(_) => Err(format!("{url}: connected, expected {kind:?}")),
        Err(e) if e.kind() != kind => Err(format!("{url}: {:?}, not {kind:?}: {e}", e.kind())),
        Err(e) => match words.iter().find(|w| !e.to_string().contains(*w)) {
            Some(w) => Err(format!("{url}: the error does not say {w:?}: {e}")),
            None => Ok(()),
        },
    }
}

async fn lock_round(client: &Client) -> TestResult {
    let guard = client
        .lock()
        .map_err(err)?
        .acquire("tls", LockOptions::new().with_wait(Duration::from_secs(5)))
        .await
        .map_err(err)?;
    guard.release().await.map_err(err)?;
    client.close().await.map_err(err)
}

/// An agent verified with `ca_file` serves locks; one signed by another CA is refused here
/// (InvalidArgument, naming the certificate), not reported as an outage.
async fn server_tls() -> TestResult {
    let pki = Pki::new()?;
    let agent = TlsConsul::start(&pki, false)?;
    let client = agent.ready(&agent.url(&pki, "")).await?;
    lock_round(&client).await?;
    let other = format!(
        "consuls://127.0.0.1:{}/x?ca_file={}",
        agent.port,
        pki.query("other-ca.pem")
    );
    refused(
        &other,
        ErrorKind::InvalidArgument,
        &["certificate was refused", "ca_file"],
    )
    .await
}

/// An agent that verifies clients: no certificate, or one of another CA, is Unauthorized; the
/// right one works.
async fn mutual_tls() -> TestResult {
    let pki = Pki::new()?;
    let agent = TlsConsul::start(&pki, true)?;
    let with = |cert: &str, key: &str| {
        format!("&cert_file={}&key_file={}", pki.query(cert), pki.query(key))
    };
    let client = agent
        .ready(&agent.url(&pki, &with("client.pem", "client-key.pem")))
        .await?;
    lock_round(&client).await?;
    refused(
        &agent.url(&pki, ""),
        ErrorKind::Unauthorized,
        &["refused this client's TLS certificate"],
    )
    .await?;
    refused(
        &agent.url(&pki, &with("other-client.pem", "other-client-key.pem")),
        ErrorKind::Unauthorized,
        &["refused this client's TLS certificate"],
    )
    .await
}

/// Files that cannot be used are named before anything is dialled.
async fn bad_files_are_named() -> TestResult {
    let pki = Pki::new()?;
    let missing = "consuls://127.0.0.1:1/x?ca_file=%2Fnonexistent%2Fca.pem";
    refused(
        missing,
        ErrorKind::InvalidArgument,
        &["ca_file", "/nonexistent/ca.pem"],
    )
    .await?;
    let not_pem = format!(
        "consuls://127.0.0.1:1/x?ca_file={}",
        pki.query("other-key.pem")
    );
    refused(
        &not_pem,
        ErrorKind::InvalidArgument,
        &["ca_file", "certificate"],
    )
    .await?;
    let mismatched = format!(
        "consuls://127.0.0.1:1/x?cert_file={}&key_file={}",
        pki.query("client.pem"),
        pki.query("ca.pem")
    );
    refused(
        &mismatched,
        ErrorKind::InvalidArgument,
        &["cert_file", "key_file"],
    )
    .await
}

type TestFn = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = TestResult> + Send>>;

fn main() -> std::process::ExitCode {
    let tests: [(&str, TestFn); 3] = [
        ("tls::server_tls", || Box::pin(server_tls())),
        ("tls::mutual_tls", || Box::pin(mutual_tls())),
        ("tls::bad_files_are_named", || {
            Box::pin(bad_files_are_named())
        }),
    ];
    let live = std::env::var("SYNC_TEST_CONSUL").is_ok_and(|u| !u.is_empty());
    let require = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            Trial::test(name, move || {
                if !live {
                    return Err("SYNC_TEST_CONSUL is not set: this test needs consul".into());
                }
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(err)?;
                let out = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(90), f())
                        .await
                        .map_err(|_| "timed out after 90s".to_string())?
                });
                rt.shutdown_timeout(Duration::from_secs(1));
                out.map_err(Into::into)
            })
            .with_ignored_flag(!live && !require)
        })
        .collect();
    libtest_mimic::run(&Arguments::from_args(), trials).exit_code()
}
