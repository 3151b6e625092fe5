//! `syncctl time`: the synchronized time, with how uncertain it is.

use crate::{
    backend,
    cli::{Global, TimeArgs},
    exit::Exit,
    output,
};

pub async fn run(global: &Global, args: TimeArgs) -> Result<u8, Exit> {
    let client = backend::connect(backend::config(global, None)?).await?;
    let interval = async { Ok::<_, Exit>(client.time()?.now_interval().await?) }.await;
    let _ = tokio::time::timeout(crate::hold::LET_GO, client.close()).await;
    let interval = interval?;
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
