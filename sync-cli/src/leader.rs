//! `syncctl elect GROUP --id ME -- CMD` (CMD runs while leader) and `syncctl leader GROUP`.

use futures::StreamExt;
use sync_core::{ElectOptions, LeaderInfo};

use crate::{
    backend,
    child::{self, Signals},
    cli::{ElectArgs, Global, LeaderArgs},
    exit::{self, Exit},
    hold, output,
};

pub async fn elect(global: &Global, args: ElectArgs) -> Result<u8, Exit> {
    let subject = format!("leadership of {:?}", args.group);
    hold::session(
        global,
        args.hold.ttl,
        &subject,
        async |client, what, signals| lead_and_run(client, global, &args, what, signals).await,
    )
    .await
}

async fn lead_and_run(
    client: &dyn sync_core::Backend,
    global: &Global,
    args: &ElectArgs,
    what: &str,
    signals: &mut Signals,
) -> Result<u8, Exit> {
    let leader = client.leader(&args.group)?;
    let mut opts = ElectOptions::new().with_value(args.value.as_bytes());
    if let Some(wait) = args.hold.wait {
        opts = opts.with_wait(wait);
    }
    let elect = async {
        leader
            .elect(&args.candidate, opts)
            .await
            .map_err(Exit::from)
    };
    let holder = || async {
        let info = leader.leader().await.ok().flatten()?;
        Some(format!(
            "candidate {:?} (term {})",
            info.candidate, info.term
        ))
    };
    let elected = hold::wait(elect, what, holder, global.quiet, signals).await?;
    let env = [
        ("SYNC_LEADER_GROUP", args.group.clone()),
        ("SYNC_CANDIDATE", args.candidate.clone()),
        ("SYNC_TERM", elected.term().to_string()),
    ];
    let revoked = elected.revoked();
    let status = hold::run(
        &args.hold,
        &env,
        what,
        revoked,
        || !elected.is_revoked(),
        signals,
    )
    .await;
    if elected.is_revoked() {
        let _ = tokio::time::timeout(backend::LET_GO, elected.resign()).await;
        return status;
    }
    let resigned = hold::let_go(elected.resign(), what).await;
    hold::after_release(status, resigned)
}

pub async fn leader(global: &Global, args: LeaderArgs) -> Result<u8, Exit> {
    let show = async |client: &dyn sync_core::Backend| {
        let leader = client.leader(&args.group)?;
        if args.follow {
            return follow(&*leader, global, &args.group).await;
        }
        let info = leader.leader().await?;
        if info.is_none() && !global.json {
            return Err(Exit::new(
                exit::NEGATIVE,
                format!("{}: no leader", args.group),
            ));
        }
        let _ = print(global, &args.group, info.as_ref());
        Ok(if info.is_some() { 0 } else { exit::NEGATIVE })
    };
    backend::with_client(global, show).await
}

/// Prints the leader and every change until the stream ends, a signal comes, or the reader of
/// stdout has gone (`| head -1`: status 141, as a shell reports SIGPIPE). A failed read (the
/// backend unreachable for a while) is told on stderr and followed on through; the stream ends
/// only on an error no retry can fix, which is then syncctl's.
async fn follow(leader: &dyn sync_core::Leader, global: &Global, group: &str) -> Result<u8, Exit> {
    // Caught only now: until here, a signal simply ends syncctl, which holds nothing.
    let mut signals = Signals::catch()?;
    let mut changes = leader.follow().await?;
    let mut check = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut failed = None;
    loop {
        tokio::select! {
            _ = check.tick() => {
                if output::stdout_gone() {
                    return Err(Exit::silent(exit::BROKEN_PIPE));
                }
            }
            next = changes.next() => match next {
                Some(Ok(info)) => {
                    failed = None;
                    if !print(global, group, info.as_ref()) {
                        return Err(Exit::silent(exit::BROKEN_PIPE));
                    }
                }
                // Told once, here: syncctl's own status when it is the stream's last item.
                Some(Err(e)) => {
                    let exit = Exit::from(e);
                    output::err(&exit.message);
                    failed = Some(exit.status);
                }
                None => return failed.map_or(Ok(0), |status| Err(Exit::silent(status))),
            },
            got = signals.recv() => return Err(child::interrupted(got)),
        }
    }
}

/// Prints one state of the group; false when stdout's reader has gone.
fn print(global: &Global, group: &str, info: Option<&LeaderInfo>) -> bool {
    if global.json {
        let leader = info.map(|i| {
            let mut entry = serde_json::json!({"candidate": i.candidate, "term": i.term});
            output::put_bytes(&mut entry, "value", &i.value);
            entry
        });
        return output::json(&serde_json::json!({"group": group, "leader": leader}));
    }
    match info {
        Some(i) => output::line(&format!(
            "{} term={} value={}",
            i.candidate,
            i.term,
            output::shown(&i.value)
        )),
        None => output::line(&format!("{group}: no leader")),
    }
}
