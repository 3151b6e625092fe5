//! `syncctl time`: the synchronized time, with how uncertain it is.

use sync_core::Backend;

use crate::{
    backend,
    cli::{Global, TimeArgs},
    exit::Exit,
    output,
};

pub async fn run(global: &Global, args: TimeArgs) -> Result<u8, Exit> {
    backend::with_client(global, async |client| print(global, &args, client).await).await
}

async fn print(global: &Global, args: &TimeArgs, client: &dyn Backend) -> Result<u8, Exit> {
    let interval = client.time()?.now_interval().await?;
    let show = |t| humantime::format_rfc3339_nanos(t).to_string();
    let (now, earliest, latest) = (
        show(interval.midpoint()),
        show(interval.earliest()),
        show(interval.latest()),
    );
    let width = interval.width();
    if global.json {
        output::json(&serde_json::json!({
            "now": now,
            "earliest": earliest,
            "latest": latest,
            "uncertainty_ns": u64::try_from(width.as_nanos() / 2).unwrap_or(u64::MAX),
        }));
    } else if args.interval {
        output::line(&format!(
            "{now} (between {earliest} and {latest}, ±{:?})",
            width / 2
        ));
    } else {
        output::line(&now);
    }
    Ok(0)
}
