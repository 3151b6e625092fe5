//! One worker process of `cargo xtask drill`: it takes a lock over and over on the backend a
//! URL names and, holding it, "writes" to a fenced resource by printing its fencing token. The
//! drill kills (-9) and stops (SIGSTOP) these processes at random and judges their lines:
//!
//! ```text
//! GRANT <token> <us>   the lock was granted with this fencing token
//! WRITE <token> <us>   a write to the resource, made while the guard said it still held
//! LOST <token> <us>    the guard reported the loss before the write, so nothing was written
//! ```
//!
//! `<us>` is the wall clock in microseconds since the Unix epoch (one machine, one clock), so
//! the drill can order the lines of all workers.
//!
//! `cargo run -p sync-any --features etcd --example drill_worker -- <url> <lock|leader> <id> <seconds>`
//!
//! With `leader` the worker campaigns in election group `<id>` instead, and its token is the
//! leadership's term.

use std::{io::Write, process::ExitCode, time::Duration};

use sync_core::LockOptions;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, what, id, seconds] = args.as_slice() else {
        eprintln!("usage: drill_worker <backend url> <lock|leader> <id> <seconds>");
        return ExitCode::FAILURE;
    };
    let Ok(seconds) = seconds.parse::<u64>() else {
        eprintln!("drill_worker: seconds must be a whole number, not {seconds:?}");
        return ExitCode::FAILURE;
    };
    let run_for = Duration::from_secs(seconds);
    let worked = match what.as_str() {
        "lock" => lock(url, id, run_for).await,
        "leader" => lead(url, id, run_for).await,
        other => {
            eprintln!("drill_worker: {other:?} is neither lock nor leader");
            return ExitCode::FAILURE;
        }
    };
    match worked {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drill_worker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn lock(url: &str, id: &str, run_for: Duration) -> sync_core::Result<()> {
    let backend = sync_any::connect(url).await?;
    let lock = backend.lock()?;
    let until = tokio::time::Instant::now() + run_for;
    let mut out = std::io::stdout();
    while tokio::time::Instant::now() < until {
        let wait = LockOptions::new().with_wait(Duration::from_secs(2));
        let guard = match lock.acquire(id, wait).await {
            Ok(guard) => guard,
            Err(e) if e.kind() == sync_core::ErrorKind::Timeout => continue,
            Err(e) => return Err(e),
        };
        let token = guard.fencing_token();
        hold(&mut out, token, || guard.is_lost()).await;
        let _ = guard.release().await;
    }
    backend.close().await
}

async fn lead(url: &str, group: &str, run_for: Duration) -> sync_core::Result<()> {
    let backend = sync_any::connect(url).await?;
    let leader = backend.leader(group)?;
    let me = std::process::id().to_string();
    let until = tokio::time::Instant::now() + run_for;
    let mut out = std::io::stdout();
    while tokio::time::Instant::now() < until {
        let wait = sync_core::ElectOptions::new().with_wait(Duration::from_secs(2));
        let elected = match leader.elect(&me, wait).await {
            Ok(elected) => elected,
            Err(e) if e.kind() == sync_core::ErrorKind::Timeout => continue,
            Err(e) => return Err(e),
        };
        hold(&mut out, elected.term(), || elected.is_revoked()).await;
        let _ = elected.resign().await;
    }
    backend.close().await
}

/// The critical section: GRANT, some work, then the write — unless `lost` says it lost.
async fn hold(out: &mut std::io::Stdout, token: u64, lost: impl Fn() -> bool) {
    let _ = writeln!(out, "GRANT {token} {}", now_us());
    tokio::time::sleep(Duration::from_millis(20 + (token % 7) * 10)).await;
    let line = match lost() {
        true => format!("LOST {token} {}", now_us()),
        false => format!("WRITE {token} {}", now_us()),
    };
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}
