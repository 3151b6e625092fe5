//! What `lock` and `elect` share: waiting with progress on stderr, and running CMD while the
//! hold lasts.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use sync_core::{Backend, ErrorKind};

use crate::{
    backend,
    child::{self, Ending, Io, Signals},
    cli::{Global, HoldArgs},
    exit::{self, Exit},
    output,
};

/// Connects to the shared backend for a hold on `subject` (`lock "x"`), runs `work` with the
/// client, the words for what it waits for, and the signals, then closes the client: its lease
/// or session ends, so nothing of this process is left held.
pub async fn session(
    global: &Global,
    ttl: Option<Duration>,
    subject: &str,
    work: impl AsyncFnOnce(&dyn Backend, &str, &mut Signals) -> Result<u8, Exit>,
) -> Result<u8, Exit> {
    let config = backend::config(global, ttl)?;
    backend::shared(&config, subject)?;
    let name = config.backend();
    let mut signals = Signals::catch()?;
    let what = format!("{subject} on {name}");
    let connect = backend::connect(config);
    let client = wait(connect, &what, nobody, global.quiet, &mut signals).await?;
    let status = work(&*client, &what, &mut signals).await;
    // What closing finds is no news: the hold was let go of (or found lost) before.
    let _ = let_go(client.close(), &format!("the {name} session")).await;
    status
}

/// When the first progress line appears, and how often the next ones do.
const FIRST_PROGRESS: Duration = Duration::from_secs(1);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Awaits `work` (connecting, acquiring), saying on stderr what it waits for and who holds it
/// (when `holder` can tell) unless `quiet`; a signal ends the wait (exit 128 + its number).
pub async fn wait<T, Who>(
    work: impl Future<Output = Result<T, Exit>>,
    what: &str,
    holder: impl Fn() -> Who,
    quiet: bool,
    signals: &mut Signals,
) -> Result<T, Exit>
where
    Who: Future<Output = Option<String>>,
{
    let started = Instant::now();
    let mut next = FIRST_PROGRESS;
    tokio::pin!(work);
    loop {
        let tick = tokio::time::sleep_until((started + next).into());
        tokio::select! {
            done = &mut work => return done,
            got = signals.recv() => return Err(child::interrupted(got)),
            () = tick, if !quiet => {
                // The work goes on meanwhile: a grant is never held up by the question.
                let who = tokio::select! {
                    done = &mut work => return done,
                    who = ask(holder()) => who,
                };
                let so_far = started.elapsed().as_secs();
                let held = who.map_or(String::new(), |w| format!("; held by {w}"));
                output::err(&format!("waiting for {what} ({so_far}s so far){held}"));
                next += PROGRESS_EVERY;
            }
        }
    }
}

/// Nobody, for the progress lines of a wait that is no contest (connecting).
pub async fn nobody() -> Option<String> {
    None
}

/// The holder, if the backend tells within a second.
async fn ask(holder: impl Future<Output = Option<String>>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(1), holder)
        .await
        .ok()
        .flatten()
}

/// Runs CMD with `env` until it exits or `lost` fires, and returns syncctl's status: CMD's own,
/// or [`exit::LOST`] when the hold was lost while it ran (`still_held` tells, once CMD exited).
pub async fn run(
    args: &HoldArgs,
    env: &[(&str, String)],
    what: &str,
    lost: impl Future<Output = String>,
    still_held: impl Fn() -> bool,
    signals: &mut Signals,
) -> Result<u8, Exit> {
    // Lost between the grant and now (a pause, say): CMD must not start at all.
    if !still_held() {
        return Err(Exit::new(
            exit::LOST,
            format!("{what} was lost before the command started"),
        ));
    }
    let mut cmd = child::spawn(&args.command, env, Io::Inherit)?;
    let ending = cmd.supervise(lost, args.grace, Some(signals)).await?;
    cmd.end_leftovers(args.grace).await;
    match ending {
        Ending::Lost(reason) => Err(Exit::new(
            exit::LOST,
            format!("{what} was lost ({reason}); the command was terminated"),
        )),
        Ending::Exited(_) if !still_held() => Err(Exit::new(
            exit::LOST,
            format!("{what} was lost as the command exited"),
        )),
        Ending::Exited(status) => Ok(exit::of_child(status)),
    }
}

/// Lets go of what `release` lets go of, bounded by [`backend::LET_GO`]. A hold the backend
/// finds already lost is reported as lost (the command may have run without it, on a backend
/// that noticed only now); other failures are warnings, as the lease frees the rest.
pub async fn let_go(
    release: impl Future<Output = sync_core::Result<()>>,
    what: &str,
) -> Result<(), Exit> {
    match tokio::time::timeout(backend::LET_GO, release).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if matches!(e.kind(), ErrorKind::LockLost | ErrorKind::NotHeld) => {
            return Err(Exit::new(
                exit::LOST,
                format!(
                    "{what} was found lost at release, so the command may have run without \
                     it: {}",
                    exit::describe(&e)
                ),
            ));
        }
        Ok(Err(e)) => output::err(&format!(
            "warning: releasing {what}: {}",
            exit::one_line(&exit::describe(&e))
        )),
        Err(_) => output::err(&format!(
            "warning: releasing {what} took over {:?}; it frees when the lease expires",
            backend::LET_GO
        )),
    }
    Ok(())
}

/// The status of a hold whose command ended with `status`, once it was let go of: a loss
/// found at the release outranks the command's own status.
pub fn after_release(status: Result<u8, Exit>, released: Result<(), Exit>) -> Result<u8, Exit> {
    match (status, released) {
        (Ok(_), Err(lost)) => Err(lost),
        (status, _) => status,
    }
}
