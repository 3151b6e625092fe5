//! Time cases (DESIGN §3 Time).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{CaseResult, Ctx, ensure, within};

/// The most a synchronized clock may differ from this machine's beyond its stated error: the
/// machine running the suite is assumed to be roughly synchronized itself.
const SYSTEM_SKEW: Duration = Duration::from_secs(1);

fn gap(a: SystemTime, b: SystemTime) -> Duration {
    a.duration_since(b)
        .or_else(|_| b.duration_since(a))
        .unwrap_or_default()
}

/// `now()` is within half the interval's width plus one second of this machine's clock,
/// taken around the call.
pub async fn now_within_bound(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let time = client.time()?;
    let width = within(ctx.prompt(), "now_interval()", time.now_interval())
        .await??
        .width();
    let before = SystemTime::now();
    let now = within(ctx.prompt(), "now()", time.now()).await??;
    let after = SystemTime::now();
    let bound = width / 2 + SYSTEM_SKEW;
    let off = if now < before {
        gap(before, now)
    } else if now > after {
        gap(now, after)
    } else {
        Duration::ZERO
    };
    ensure!(
        off <= bound,
        "now() is {off:?} outside the system time around the call; the bound is {bound:?} \
         (interval width {width:?})"
    );
    Ok(())
}

/// `now_interval()` overlaps the system time around the call: `earliest` is not after the time
/// taken after it, and `latest` is not before the time taken before it. The interval is the
/// backend's stated error; nothing more is allowed. `after`/`before` agree with it.
pub async fn interval_contains_system_time(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let time = client.time()?;
    let before = SystemTime::now();
    let iv = within(ctx.prompt(), "now_interval()", time.now_interval()).await??;
    let after = SystemTime::now();
    ensure!(
        iv.earliest() <= after,
        "earliest is {:?} after the system time taken after the call (interval {iv:?})",
        gap(iv.earliest(), after)
    );
    ensure!(
        iv.latest() >= before,
        "latest is {:?} before the system time taken before the call (interval {iv:?})",
        gap(before, iv.latest())
    );

    let long_ago = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let far_off = SystemTime::now() + Duration::from_secs(24 * 3600);
    ensure!(
        time.after(long_ago).await?,
        "after(2001) is false: the clock is not past a time long gone"
    );
    ensure!(!time.before(long_ago).await?, "before(2001) is true");
    ensure!(time.before(far_off).await?, "before(now + 1 day) is false");
    ensure!(!time.after(far_off).await?, "after(now + 1 day) is true");
    Ok(())
}

/// Over many calls the interval is never inverted (`earliest ≤ latest`), and its width stays
/// under a minute.
pub async fn interval_never_inverted(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let time = client.time()?;
    let calls = 500;
    let mut widest = Duration::ZERO;
    for i in 0..calls {
        let iv = within(ctx.prompt(), "now_interval()", time.now_interval()).await??;
        ensure!(
            iv.earliest() <= iv.latest(),
            "call {i}: earliest {:?} is after latest {:?}",
            iv.earliest(),
            iv.latest()
        );
        widest = widest.max(iv.width());
    }
    ensure!(
        widest < Duration::from_secs(60),
        "the interval was {widest:?} wide: an uncertainty that large is not synchronized time"
    );
    Ok(())
}
