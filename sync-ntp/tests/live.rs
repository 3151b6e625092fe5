//! Figures measured against a live NTP server (chronyd from `cargo xtask services up ntp`):
//! `SYNC_TEST_NTP=ntp://127.0.0.1:11123 cargo test -p sync-ntp --test live -- --nocapture`.
//! Without the variable the tests show as ignored, or fail under `SYNC_REQUIRE_LIVE=1`, like
//! the conformance cases.

use std::{
    process::ExitCode,
    time::{Duration, Instant, SystemTime},
};

use libtest_mimic::{Arguments, Failed, Trial};
use sync_core::Backend;
use sync_ntp::{Client, Config};

/// The config of the `SYNC_TEST_NTP` URL (`ntp://host:port`).
fn config(url: &str) -> Result<Config, Failed> {
    Ok(Config::from_url(url)?)
}

fn block_on<F: std::future::Future<Output = Result<(), Failed>>>(f: F) -> Result<(), Failed> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

/// The interval contains this machine's time (chronyd serves this machine's clock), and its
/// half-width is at most round trip / 2 + the server's root distance (root delay / 2 + root
/// dispersion) + the drift allowance since the sync: the width at most twice that.
async fn interval_contains_system_time_within_the_stated_bound(
    endpoint: String,
) -> Result<(), Failed> {
    let config = config(&endpoint)?;
    let drift_ppm = config.drift_ppm;
    let client = Client::connect(config).await?;
    let time = client.time()?;
    let synced = Instant::now();
    time.now_interval().await?; // sync on demand
    let report = client
        .last_sync()
        .ok_or("no sync report after a successful call")?;
    let [sample] = report.samples.as_slice() else {
        return Err(format!("expected one server's sample: {report:?}").into());
    };
    let before = SystemTime::now();
    let iv = time.now_interval().await?;
    let after = SystemTime::now();
    if !(iv.earliest() <= after && iv.latest() >= before) {
        return Err(format!(
            "interval {iv:?} does not contain the system time {before:?}..{after:?}"
        )
        .into());
    }
    let root_distance = sample.root_delay / 2 + sample.root_dispersion;
    // Drift allowance since the sync: at most drift_ppm of the time since before the sync.
    let drift = Duration::from_secs_f64(synced.elapsed().as_secs_f64() * drift_ppm / 1e6);
    let rounding = Duration::from_nanos(4);
    let bound = sample.round_trip + root_distance * 2 + drift * 2 + rounding;
    println!(
        "live {}: stratum {} ref {} | round trip {:?}, root delay {:?}, root dispersion {:?}, \
         root distance {:?}, offset {:+.6} s | interval width {:?} <= bound {:?} \
         (round trip + 2 x root distance + 2 x drift {:?})",
        sample.server,
        sample.stratum,
        sample.reference_id,
        sample.round_trip,
        sample.root_delay,
        sample.root_dispersion,
        root_distance,
        sample.offset_secs,
        iv.width(),
        bound,
        drift,
    );
    if iv.width() > bound {
        return Err(format!(
            "interval width {:?} exceeds the bound {bound:?}: {sample:?}",
            iv.width()
        )
        .into());
    }
    if client.queries() != 1 {
        return Err(format!("{} queries for one sync of one server", client.queries()).into());
    }
    Ok(())
}

/// One sync, then 10 000 `now()` calls: exactly the sync's one query, no more.
async fn ten_thousand_now_calls_make_only_the_syncs_queries(
    endpoint: String,
) -> Result<(), Failed> {
    let client = Client::connect(config(&endpoint)?).await?;
    let time = client.time()?;
    time.now().await?;
    let after_sync = client.queries();
    let start = Instant::now();
    for _ in 0..10_000 {
        time.now().await?;
    }
    let took = start.elapsed();
    println!(
        "live: one sync made {after_sync} query; after 10 000 now() calls ({took:?}) the total is {}",
        client.queries()
    );
    if after_sync != 1 || client.queries() != 1 {
        return Err(format!(
            "expected exactly 1 query, got {after_sync} for the sync and {} in total",
            client.queries()
        )
        .into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let endpoint = std::env::var("SYNC_TEST_NTP")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let required = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
    type Test = fn(
        String,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), Failed>> + Send>,
    >;
    let tests: [(&str, Test); 2] = [
        (
            "live::interval_contains_system_time_within_the_stated_bound",
            |e| Box::pin(interval_contains_system_time_within_the_stated_bound(e)),
        ),
        (
            "live::ten_thousand_now_calls_make_only_the_syncs_queries",
            |e| Box::pin(ten_thousand_now_calls_make_only_the_syncs_queries(e)),
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, test)| match endpoint.clone() {
            Some(e) => Trial::test(name, move || block_on(test(e))),
            None => {
                let why = "SYNC_TEST_NTP is not set: these tests need a live NTP server \
                           (`cargo xtask services up ntp`)";
                let why = if required {
                    format!("SYNC_REQUIRE_LIVE=1 but {why}")
                } else {
                    why.to_string()
                };
                Trial::test(name, move || Err(why.clone().into())).with_ignored_flag(!required)
            }
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
