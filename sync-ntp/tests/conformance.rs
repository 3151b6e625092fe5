//! The conformance suite's time cases live against an NTP server (chronyd from
//! `cargo xtask services up ntp`): `SYNC_TEST_NTP=ntp://127.0.0.1:11123 cargo test -p sync-ntp
//! --test conformance`. Without the variable every case shows as ignored (or fails under
//! `SYNC_REQUIRE_LIVE=1`); only Time is supported, everything else is reported unsupported.

fn main() -> std::process::ExitCode {
    // NTP has no namespace: every case's client queries the same servers.
    sync_conformance::run("ntp", Some("SYNC_TEST_NTP"), |url, _namespace| async move {
        sync_ntp::Client::from_url(&url).await
    })
}
