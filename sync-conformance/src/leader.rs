//! Leader election cases (DESIGN §3 Leader).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use sync_core::{ElectOptions, FollowStream, Leader, LeaderInfo};

use crate::{
    CaseResult, Context, Ctx, Failure, ensure, ensure_increasing, fail,
    spans::{Seen, spans_of},
    stays_pending, within,
};

/// The next state a follow stream reports, within `limit`.
async fn next_state(
    stream: &mut FollowStream,
    limit: Duration,
    what: &str,
) -> Result<Option<LeaderInfo>, Failure> {
    match within(limit, what.to_string(), stream.next()).await? {
        Some(item) => item.context(format!("{what}: the follow stream yielded an error")),
        None => fail!("{what}: the follow stream ended"),
    }
}

fn who(state: &Option<LeaderInfo>) -> Option<(&str, u64)> {
    state.as_ref().map(|i| (i.candidate.as_str(), i.term))
}

/// Five candidates over two clients campaign at once: at most one is elected at any time,
/// each resigns in turn, all eventually lead, and the terms strictly increase.
pub async fn single_leader(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let handles = [a.leader("single")?, b.leader("single")?];
    let leading = Arc::new(AtomicUsize::new(0));
    let led = Arc::new(Mutex::new(Vec::new()));
    let candidates = 5;
    let wait = ctx.prompt() * candidates;
    let mut tasks = Vec::new();
    for c in 0..candidates {
        let leader = handles[c as usize % 2].clone();
        let (leading, led) = (leading.clone(), led.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("candidate-{c}");
            let elected = leader
                .elect(&name, ElectOptions::new().with_wait(wait))
                .await
                .context(format!("{name}: elect"))?;
            let before = leading.fetch_add(1, Ordering::SeqCst);
            led.lock().unwrap().push((name.clone(), elected.term()));
            // Stay leader a moment so a wrongly elected second leader would overlap.
            let current = leader.leader().await;
            leading.fetch_sub(1, Ordering::SeqCst);
            ensure!(
                before == 0,
                "{name} was elected while {before} other candidate(s) led"
            );
            let current = current.context(format!("{name}: leader()"))?;
            ensure!(
                who(&current) == Some((name.as_str(), elected.term())),
                "{name} leads with term {} but leader() reports {current:?}",
                elected.term()
            );
            elected.resign().await.context(format!("{name}: resign"))?;
            Ok::<_, Failure>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let led = led.lock().unwrap().clone();
    let mut names: Vec<&str> = led.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    names.dedup();
    ensure!(
        names.len() == candidates as usize && led.len() == candidates as usize,
        "every candidate must lead exactly once; leaderships: {led:?}"
    );
    let terms: Vec<u64> = led.iter().map(|(_, term)| *term).collect();
    ensure_increasing(&format!("terms across leaderships {led:?}"), &terms)
}

/// A waiting candidate is not elected while the leader leads, and is elected promptly once
/// it resigns, with a greater term.
pub async fn resign_hands_over(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let lb = b.leader("handover")?;
    let first = a
        .leader("handover")?
        .elect("A", ElectOptions::new())
        .await?;
    let mut next = Box::pin(lb.elect("B", ElectOptions::new()));
    stays_pending(
        Duration::from_millis(300),
        "B elected while A leads",
        &mut next,
    )
    .await?;
    let term = first.term();
    first.resign().await?;
    let second = within(ctx.prompt(), "B elected after A resigned", next).await??;
    ensure!(
        second.candidate() == "B",
        "elected {:?}",
        second.candidate()
    );
    ensure!(
        second.term() > term,
        "term went from {term} to {}",
        second.term()
    );
    Ok(())
}

/// Revoking the leader's lease fires `revoked()` promptly, a waiting candidate is then
/// elected, and the old leader knew before the new one was elected.
pub async fn revoked_on_lease_revoke(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let first = a.leader("revoke")?.elect("A", ElectOptions::new()).await?;
    let revoked = first.revocation_signal();
    let lb = b.leader("revoke")?;
    let waiter = tokio::spawn(async move {
        let e = lb.elect("B", ElectOptions::new()).await;
        (e, revoked.is_lost())
    });
    a.revoke().await?;
    within(
        ctx.prompt(),
        "revoked() after the lease was revoked",
        first.revoked(),
    )
    .await?;
    let (second, old_knew) = within(ctx.expiry(), "B elected after A's revoke", waiter).await??;
    let second = second.context("B's elect")?;
    ensure!(
        old_knew,
        "B was elected before A's revoked() fired: two leaders at once"
    );
    ensure!(
        second.term() > first.term(),
        "term went from {} to {}",
        first.term(),
        second.term()
    );
    Ok(())
}

/// `follow()` starts with the current state (no leader), reports A once A leads, and after A
/// resigns reports B (possibly via "no leader"), never going back to A, each change promptly.
pub async fn follow_sees_changes(ctx: &Ctx) -> CaseResult {
    let (a, b, c) = (
        ctx.client().await?,
        ctx.client().await?,
        ctx.client().await?,
    );
    let mut stream = c.leader("follow")?.follow().await?;
    let initial = next_state(&mut stream, ctx.prompt(), "initial state").await?;
    ensure!(
        initial.is_none(),
        "an empty group's first state was {initial:?}"
    );

    let ea = a.leader("follow")?.elect("A", ElectOptions::new()).await?;
    let state = next_state(&mut stream, ctx.prompt(), "A's election reported").await?;
    ensure!(
        who(&state) == Some(("A", ea.term())),
        "after A was elected with term {} the stream reported {state:?}",
        ea.term()
    );

    let lb = b.leader("follow")?;
    let waiter = tokio::spawn(async move { lb.elect("B", ElectOptions::new()).await });
    // B's campaign must not show up as a leader while A leads (repeating A is allowed).
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        let state = item.transpose().context("follow while A leads")?.flatten();
        ensure!(
            who(&state) == Some(("A", ea.term())),
            "while A led and B campaigned the stream reported {state:?}"
        );
    }

    let a_term = ea.term();
    ea.resign().await?;
    let mut seen = Vec::new();
    let eb = loop {
        let state = next_state(&mut stream, ctx.prompt(), "B's election reported").await?;
        seen.push(state.clone());
        match who(&state) {
            None => {}
            Some(("B", term)) => {
                let eb = within(ctx.prompt(), "B's elect returning", waiter).await???;
                ensure!(
                    term == eb.term() && term > a_term,
                    "stream reported B with term {term}; B was elected with {} after A's {a_term}",
                    eb.term(),
                );
                break eb;
            }
            _ => fail!("after A resigned the stream reported {state:?} (all: {seen:?})"),
        }
    };

    eb.resign().await?;
    let state = next_state(&mut stream, ctx.prompt(), "B's resignation reported").await?;
    ensure!(
        state.is_none(),
        "after the last leader resigned the stream reported {state:?}"
    );
    Ok(())
}

/// Terms strictly increase across successive leaderships from different clients, and
/// `leader()` reports each leadership's term.
pub async fn terms_increase(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let handles = [a.leader("terms")?, b.leader("terms")?];
    let mut terms = Vec::new();
    for round in 0..6 {
        let leader = &handles[round % 2];
        let name = format!("c{round}");
        let elected = within(
            ctx.prompt(),
            format!("{name} elected in an empty group"),
            leader.elect(&name, ElectOptions::new()),
        )
        .await??;
        let current = handles[(round + 1) % 2].leader().await?;
        ensure!(
            who(&current) == Some((name.as_str(), elected.term())),
            "{name} leads with term {} but the other client's leader() says {current:?}",
            elected.term()
        );
        terms.push(elected.term());
        elected.resign().await?;
    }
    ensure_increasing("terms", &terms)
}

/// The value given at election and each later `proclaim` is what `leader()` and `follow()`
/// report to other clients, under the same term.
pub async fn proclaim_visible_to_followers(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let observer = b.leader("proclaim")?;
    let elected = a
        .leader("proclaim")?
        .elect("A", ElectOptions::new().with_value(b"v1".to_vec()))
        .await?;
    let expect = |value: &[u8]| LeaderInfo::new("A", elected.term(), value.to_vec());

    let current = observer.leader().await?;
    ensure!(
        current == Some(expect(b"v1")),
        "leader() after electing with value v1: {current:?}"
    );
    let mut stream = observer.follow().await?;
    let state = next_state(&mut stream, ctx.prompt(), "follow's initial state").await?;
    ensure!(
        state == Some(expect(b"v1")),
        "follow's first state: {state:?}"
    );

    elected.proclaim(b"v2").await?;
    let current = observer.leader().await?;
    ensure!(
        current == Some(expect(b"v2")),
        "leader() after proclaiming v2: {current:?}"
    );
    loop {
        let state = next_state(&mut stream, ctx.prompt(), "the proclaimed v2 followed").await?;
        if state == Some(expect(b"v2")) {
            break;
        }
        // Repeating the old state is allowed; anything else is not.
        ensure!(
            state == Some(expect(b"v1")),
            "follow reported {state:?} before v2"
        );
    }
    elected.resign().await?;
    Ok(())
}

/// `leader()` is None while nobody leads, the candidate and term while one does, and None
/// again once it resigns.
pub async fn leader_reports_current(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let observer: Arc<dyn Leader> = b.leader("current")?;
    ensure!(
        observer.group() == "current",
        "group() is {:?}",
        observer.group()
    );
    let nobody = observer.leader().await?;
    ensure!(nobody.is_none(), "leader() of an empty group: {nobody:?}");

    let elected = a.leader("current")?.elect("A", ElectOptions::new()).await?;
    let current = observer.leader().await?;
    ensure!(
        who(&current) == Some(("A", elected.term())),
        "A leads with term {} but leader() says {current:?}",
        elected.term()
    );
    let term = elected.term();
    elected.resign().await?;
    let after = observer.leader().await?;
    ensure!(
        after.is_none(),
        "leader() after the only leader resigned: {after:?}"
    );

    let again = b.leader("current")?.elect("B", ElectOptions::new()).await?;
    let current = observer.leader().await?;
    ensure!(
        who(&current) == Some(("B", again.term())) && again.term() > term,
        "B leads with term {} (A had {term}) but leader() says {current:?}",
        again.term()
    );
    Ok(())
}

/// For a backend's own tests: follows `group` through `backend`, which must first report it
/// leaderless.
pub async fn follow_empty(
    backend: &dyn sync_core::Backend,
    group: &str,
) -> Result<FollowStream, String> {
    let leader = backend.leader(group).map_err(|e| e.to_string())?;
    let mut follow = leader.follow().await.map_err(|e| e.to_string())?;
    match follow.next().await {
        Some(Ok(None)) => Ok(follow),
        other => Err(format!(
            "first report of the empty group {group}: {other:?}"
        )),
    }
}

/// For a backend's rights tests: reads `stream` until it reports an error, passing over the
/// leader changes before it. The error must be Unauthorized, and the stream must end right
/// after it (a follower refused for good is told once, then not read for again). Returns the
/// refusal's message.
pub async fn refused_then_ends(
    stream: &mut FollowStream,
    limit: Duration,
) -> Result<String, String> {
    let refusal = tokio::time::timeout(limit, async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Ok(e),
                None => return Err("the follow stream ended without an error".to_string()),
            }
        }
    })
    .await
    .map_err(|_| format!("no refusal reported within {limit:?}"))??;
    if refusal.kind() != sync_core::ErrorKind::Unauthorized {
        return Err(format!(
            "reported {:?}, not Unauthorized: {refusal}",
            refusal.kind()
        ));
    }
    match tokio::time::timeout(limit, stream.next()).await {
        Ok(None) => Ok(refusal.to_string()),
        Ok(Some(item)) => Err(format!(
            "after the refusal ({refusal}) the stream went on: {item:?}"
        )),
        Err(_) => Err(format!(
            "the stream did not end within {limit:?} of the refusal ({refusal})"
        )),
    }
}

/// Each leader operation shows a `tracing` subscriber exactly one span (DESIGN §2), `sync`,
/// with the operation and the group; the backend nests no second span in it.
pub async fn one_span_per_operation(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let leader = client.leader("spans")?;
    // A session opens on first use: not part of what is heard.
    let warm_up = client
        .lock()?
        .acquire("warm-up", Default::default())
        .await?;
    warm_up.release().await?;
    let (done, seen) = spans_of(async {
        let elected = leader.elect("me", ElectOptions::new()).await?;
        leader.leader().await?;
        drop(leader.follow().await?);
        elected.proclaim(b"v").await?;
        elected.resign().await?;
        Ok::<_, Failure>(())
    })
    .await;
    done?;
    let expected = [
        "leader.elect",
        "leader.leader",
        "leader.follow",
        "leader.proclaim",
        "leader.resign",
    ]
    .map(|op| Seen::op(op, "spans"));
    ensure!(
        seen == expected,
        "the spans opened were {seen:#?}, expected {expected:#?}"
    );
    Ok(())
}
