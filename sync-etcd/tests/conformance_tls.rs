//! The conformance suite over mutual TLS: a private etcd serving certificates this test makes
//! (see `common::tls`), reached through `etcds://` with `ca_file`, `cert_file` and `key_file`,
//! directly and through the suite's fault proxies. Gated like the plain suite on
//! `SYNC_TEST_ETCD` (every live test's switch); needs the `tls` feature and `etcd` and
//! `etcdctl` on the PATH.
//!
//! The suite takes its URL from an environment variable, so this binary starts the etcd and
//! runs itself again with `SYNC_TEST_ETCD_TLS` set to the `etcds://` URL (same arguments).
//!
//! Skipped: the cases whose proxy holds the one request whose bytes contain a key
//! ([`ENCRYPTED_AWAY`]); TLS hides those bytes from the proxy. They run on plain etcd.

mod common;

use std::process::ExitCode;

use common::tls::{Pki, TlsEtcd};
use sync_etcd::{Client, Config, MIN_TTL};

const URL_VAR: &str = "SYNC_TEST_ETCD_TLS";

/// The cases that find their request in the bytes passing through a fault proxy.
const ENCRYPTED_AWAY: [&str; 2] = [
    "etcd::fault::ambiguous_swap_is_resolved",
    "etcd::task::ambiguous_claim_neither_loses_nor_strands_the_job",
];

fn main() -> ExitCode {
    let live = std::env::var("SYNC_TEST_ETCD").is_ok_and(|v| !v.trim().is_empty());
    if live && std::env::var_os(URL_VAR).is_none() {
        return with_a_tls_etcd();
    }
    // Without the gate the cases show as ignored (or fail with SYNC_REQUIRE_LIVE=1).
    let var = if live { URL_VAR } else { "SYNC_TEST_ETCD" };
    sync_conformance::run("etcd", Some(var), |url, namespace| async move {
        let config = Config::from_url(&url)?
            .with_namespace(namespace)
            .with_ttl(MIN_TTL)
            .with_job_retention(sync_conformance::JOB_RETENTION)
            .with_request_timeout(std::time::Duration::from_secs(3));
        Client::connect(config).await
    })
}

/// Starts a mutual-TLS etcd, runs this binary again against it, and stops it.
fn with_a_tls_etcd() -> ExitCode {
    let started = Pki::new().and_then(|pki| TlsEtcd::start(&pki, true).map(|etcd| (pki, etcd)));
    let (pki, etcd) = match started {
        Ok(started) => started,
        Err(e) => {
            eprintln!("conformance_tls: {e}");
            return ExitCode::FAILURE;
        }
    };
    let identity = format!(
        "&cert_file={}&key_file={}",
        pki.query("client.pem"),
        pki.query("client-key.pem")
    );
    let url = etcd.url(&pki, "sync", &identity);
    let status = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .args(ENCRYPTED_AWAY.iter().flat_map(|case| ["--skip", case]))
            .env(URL_VAR, &url)
            .status()
    });
    drop(etcd);
    drop(pki);
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1)),
        Err(e) => {
            eprintln!("conformance_tls: running the suite: {e}");
            ExitCode::FAILURE
        }
    }
}
