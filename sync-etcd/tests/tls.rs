//! etcd over TLS, live: private etcds serving certificates this test makes (rcgen), one with
//! server TLS and one with mutual TLS (`--client-cert-auth`). Real locks, map CASes and jobs
//! go through `etcds://` URLs, and every bad setup fails with a kind that is not retryable and
//! a message that names the file or the cause. Needs the `tls` feature, `etcd` and `etcdctl`
//! on the PATH, and (as the gate every live test shares) `SYNC_TEST_ETCD`, whose plain etcd
//! stands in for an endpoint that does not speak TLS.

mod common;

use std::{sync::Arc, time::Duration};

use common::{
    TestFn, TestResult,
    tls::{Pki, TlsEtcd},
};
use sync_core::{Backend, ErrorKind, HandlerError, Job, JobContext, JobState, LockOptions};
use sync_etcd::{Client, Config};

fn unique(what: &str) -> String {
    common::unique("tls", what)
}

async fn connect(url: &str) -> Result<Client, String> {
    let config = Config::from_url(url).map_err(|e| format!("{url}: {e}"))?;
    Client::connect(config)
        .await
        .map_err(|e| format!("connecting to {url}: {:?}: {e}", e.kind()))
}

/// A lock acquired and released, a map compare-and-swap (and its conflict), and a job run by
/// a worker: every kind of call, through this client.
async fn exercise(client: &Client) -> TestResult {
    let guard = client
        .lock()
        .map_err(|e| e.to_string())?
        .acquire("tls-lock", LockOptions::new())
        .await
        .map_err(|e| format!("acquiring: {e}"))?;
    guard
        .release()
        .await
        .map_err(|e| format!("releasing: {e}"))?;

    let map = client.map("tls-map").map_err(|e| e.to_string())?;
    let v1 = map
        .compare_and_swap("k", None, b"one")
        .await
        .map_err(|e| format!("creating with CAS: {e}"))?;
    let v2 = map
        .compare_and_swap("k", Some(v1), b"two")
        .await
        .map_err(|e| format!("swapping: {e}"))?;
    match map.compare_and_swap("k", Some(v1), b"stale").await {
        Err(e) if e.kind() == ErrorKind::Conflict => {}
        other => return Err(format!("a stale CAS gave {other:?}, not Conflict")),
    }
    let entry = map.read("k").await.map_err(|e| e.to_string())?;
    if entry.as_ref().map(|e| (e.value.as_slice(), e.version)) != Some((&b"two"[..], v2)) {
        return Err(format!("read back {entry:?}"));
    }

    let task = client.task().map_err(|e| e.to_string())?;
    let handler = Arc::new(|ctx: JobContext| async move {
        let mut out = ctx.payload;
        out.reverse();
        Ok::<_, HandlerError>(out)
    });
    let worker = task
        .work("tls-job", handler, Default::default())
        .await
        .map_err(|e| format!("starting a worker: {e}"))?;
    let id = task
        .submit(Job::new("tls-job", b"abc".to_vec()))
        .await
        .map_err(|e| format!("submitting: {e}"))?;
    let status = task
        .wait(&id, Some(Duration::from_secs(20)))
        .await
        .map_err(|e| format!("waiting for the job: {e}"))?;
    worker.stop().await;
    if status.state != JobState::Succeeded || status.output.as_deref() != Some(&b"cba"[..]) {
        return Err(format!("the job ended {status:?}"));
    }
    client.close().await.map_err(|e| format!("closing: {e}"))
}

/// The error connecting with `url` gives: it must be `kind` and say every one of `says`.
async fn refused(url: &str, kind: ErrorKind, says: &[&str]) -> TestResult {
    let connected = match Config::from_url(url) {
        Ok(config) => Client::connect(config).await,
        Err(e) => Err(e),
    };
    let err = match connected {
        Ok(client) => {
            let _ = client.close().await;
            return Err(format!("{url} connected"));
        }
        Err(e) => e,
    };
    let message = err.to_string();
    if err.kind() != kind {
        return Err(format!("{url}: {:?}, not {kind:?}: {message}", err.kind()));
    }
    match says.iter().find(|s| !message.contains(*s)) {
        Some(missing) => Err(format!("{url}: {message:?} does not say {missing:?}")),
        None => Ok(()),
    }
}

/// Server TLS: the client checks etcd's certificate against `ca_file`, by IP and by
/// `tls_domain`.
async fn server_tls(_endpoint: String) -> TestResult {
    let pki = Pki::new()?;
    let etcd = TlsEtcd::start(&pki, false)?;
    let client = connect(&etcd.url(&pki, &unique("server"), "")).await?;
    exercise(&client).await?;
    let client = connect(&etcd.url(&pki, &unique("domain"), "&tls_domain=localhost")).await?;
    exercise(&client).await
}

/// Mutual TLS: a client certificate signed by etcd's `--trusted-ca-file` gets in.
async fn mutual_tls(_endpoint: String) -> TestResult {
    let pki = Pki::new()?;
    let etcd = TlsEtcd::start(&pki, true)?;
    let identity = format!(
        "&cert_file={}&key_file={}",
        pki.query("client.pem"),
        pki.query("client-key.pem")
    );
    let client = connect(&etcd.url(&pki, &unique("mutual"), &identity)).await?;
    exercise(&client).await
}

/// etcd refusing this client's certificate (none, or one of a CA it does not trust) is
/// Unauthorized, not a retryable Unavailable.
async fn client_certificate_refused(_endpoint: String) -> TestResult {
    let pki = Pki::new()?;
    let etcd = TlsEtcd::start(&pki, true)?;
    let says = ["refused this client's certificate", "cert_file"];
    refused(
        &etcd.url(&pki, &unique("no-cert"), ""),
        ErrorKind::Unauthorized,
        &says,
    )
    .await?;
    let untrusted = format!(
        "&cert_file={}&key_file={}",
        pki.query("other-client.pem"),
        pki.query("other-client-key.pem")
    );
    refused(
        &etcd.url(&pki, &unique("untrusted"), &untrusted),
        ErrorKind::Unauthorized,
        &says,
    )
    .await
}

/// The server's certificate refused here (signed by another CA, or not naming the host) and
/// an endpoint without TLS are setup mistakes: InvalidArgument, with the cause.
async fn server_certificate_refused(endpoint: String) -> TestResult {
    let pki = Pki::new()?;
    let etcd = TlsEtcd::start(&pki, false)?;
    let other_ca = format!(
        "etcds://{}/{}?ca_file={}&ttl=2s",
        etcd.authority,
        unique("other-ca"),
        pki.query("other-ca.pem")
    );
    refused(
        &other_ca,
        ErrorKind::InvalidArgument,
        &[
            "server's certificate was refused",
            "UnknownIssuer",
            "ca_file",
        ],
    )
    .await?;
    refused(
        &etcd.url(&pki, &unique("name"), "&tls_domain=elsewhere.example"),
        ErrorKind::InvalidArgument,
        &["server's certificate was refused", "tls_domain"],
    )
    .await?;
    // The shared etcd of SYNC_TEST_ETCD serves plain http.
    let plain = format!(
        "etcds://{}/{}?ca_file={}&ttl=2s",
        common::authority(&endpoint),
        unique("plain"),
        pki.query("ca.pem")
    );
    refused(
        &plain,
        ErrorKind::InvalidArgument,
        &["during the TLS handshake", "does it serve TLS"],
    )
    .await
}

/// Bad PEM files are refused before dialling, naming the file and the problem, even against
/// an etcd that would take a good config.
async fn bad_files_are_named(_endpoint: String) -> TestResult {
    let pki = Pki::new()?;
    let etcd = TlsEtcd::start(&pki, true)?;
    pki.write("empty.pem", "").map_err(|e| e.to_string())?;
    pki.write("garbage.pem", "not a certificate\n")
        .map_err(|e| e.to_string())?;
    let with_ca = |ca: &str, extra: &str| {
        format!(
            "etcds://{}/{}?ca_file={}&ttl=2s{extra}",
            etcd.authority,
            unique("files"),
            pki.query(ca)
        )
    };
    let pair = |cert: &str, key: &str| {
        format!("&cert_file={}&key_file={}", pki.query(cert), pki.query(key))
    };
    let good_pair = pair("client.pem", "client-key.pem");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            with_ca("missing.pem", &good_pair),
            vec!["ca_file", "missing.pem", "cannot be read"],
        ),
        (
            with_ca("empty.pem", &good_pair),
            vec!["ca_file", "empty.pem", "is empty"],
        ),
        (
            with_ca("garbage.pem", &good_pair),
            vec!["ca_file", "garbage.pem", "no PEM certificate"],
        ),
        (
            with_ca("client-key.pem", &good_pair),
            vec![
                "ca_file",
                "client-key.pem",
                "a private key, not a certificate",
            ],
        ),
        (
            with_ca("ca.pem", &format!("&cert_file={}", pki.query("client.pem"))),
            vec!["cert_file", "client.pem", "without key_file"],
        ),
        (
            with_ca(
                "ca.pem",
                &format!("&key_file={}", pki.query("client-key.pem")),
            ),
            vec!["key_file", "client-key.pem", "without cert_file"],
        ),
        (
            with_ca("ca.pem", &pair("client.pem", "other-key.pem")),
            vec!["client.pem", "other-key.pem", "do not match"],
        ),
        (
            with_ca("ca.pem", &pair("client.pem", "garbage.pem")),
            vec!["key_file", "garbage.pem", "no PEM private key"],
        ),
        (
            with_ca("ca.pem", &pair("client.pem", "client.pem")),
            vec!["key_file", "client.pem", "a certificate, not a private key"],
        ),
        (
            with_ca("ca.pem", &pair("client-key.pem", "client-key.pem")),
            vec![
                "cert_file",
                "client-key.pem",
                "a private key, not a certificate",
            ],
        ),
    ];
    for (url, says) in cases {
        refused(&url, ErrorKind::InvalidArgument, &says).await?;
    }
    // And the good pair, for contrast, gets in.
    let client = connect(&with_ca("ca.pem", &good_pair)).await?;
    client.close().await.map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    let tests: [(&'static str, TestFn); 5] = [
        ("tls::server_tls", |e| Box::pin(server_tls(e))),
        ("tls::mutual_tls", |e| Box::pin(mutual_tls(e))),
        ("tls::client_certificate_refused", |e| {
            Box::pin(client_certificate_refused(e))
        }),
        ("tls::server_certificate_refused", |e| {
            Box::pin(server_certificate_refused(e))
        }),
        ("tls::bad_files_are_named", |e| {
            Box::pin(bad_files_are_named(e))
        }),
    ];
    common::run(&tests, libtest_mimic::Arguments::from_args())
}
