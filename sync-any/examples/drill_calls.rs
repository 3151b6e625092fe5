//! The worker of `cargo xtask drill`'s frozen-endpoint run: it holds one lock for the whole
//! run and meanwhile makes calls without pause (a Map read, a Map write, a lock taken and
//! released), timing each. The drill freezes backend members under it and judges its lines:
//!
//! ```text
//! SLOW <op> <ms> ok|<error kind> <message>   a call that took over 100 ms, or failed
//! LOST <us> <reason>                         the held lock was reported lost
//! DONE <calls> <failed> <worst ms> <held lock lost: true|false>
//! ```
//!
//! `cargo run -p sync-any --features etcd --example drill_calls -- <url> <seconds>`

use std::{
    future::Future,
    process::ExitCode,
    time::{Duration, Instant},
};

use sync_core::{Backend, LockOptions, Result};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, seconds] = args.as_slice() else {
        eprintln!("usage: drill_calls <backend url> <seconds>");
        return ExitCode::FAILURE;
    };
    let Ok(seconds) = seconds.parse::<u64>() else {
        eprintln!("drill_calls: seconds must be a whole number, not {seconds:?}");
        return ExitCode::FAILURE;
    };
    match calls(url, Duration::from_secs(seconds)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drill_calls: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the calls came to.
#[derive(Default)]
struct Tally {
    calls: u64,
    failed: u64,
    worst: Duration,
}

impl Tally {
    /// Runs `call`, timing it; prints it when it was slow or failed.
    async fn time(&mut self, op: &str, call: impl Future<Output = Result<()>>) {
        let started = Instant::now();
        let result = call.await;
        let took = started.elapsed();
        self.calls += 1;
        self.worst = self.worst.max(took);
        let outcome = match &result {
            Ok(()) if took <= Duration::from_millis(100) => return,
            Ok(()) => "ok".to_string(),
            Err(e) => {
                self.failed += 1;
                format!("{:?} {e}", e.kind())
            }
        };
        println!("SLOW {op} {} {outcome}", took.as_millis());
    }
}

async fn calls(url: &str, run_for: Duration) -> Result<()> {
    let backend = sync_any::connect(url).await?;
    let (lock, map) = (backend.lock()?, backend.map("drill")?);
    let held = lock.acquire("held", LockOptions::new()).await?;
    let mut tally = Tally::default();
    let until = Instant::now() + run_for;
    let mut reported = false;
    while Instant::now() < until {
        tally
            .time("read", async { map.read("k").await.map(drop) })
            .await;
        tally
            .time("write", async { map.write("k", b"v").await.map(drop) })
            .await;
        let wait = LockOptions::new().with_wait(Duration::from_secs(10));
        let mut guard = None;
        tally
            .time("acquire", async {
                guard = Some(lock.acquire("busy", wait).await?);
                Ok(())
            })
            .await;
        if let Some(guard) = guard {
            tally.time("release", guard.release()).await;
        }
        if held.is_lost() && !reported {
            reported = true;
            let reason = held.loss_signal().reason().unwrap_or_default();
            println!("LOST {} {reason}", now_us());
        }
    }
    let lost = held.is_lost();
    println!(
        "DONE {} {} {} {lost}",
        tally.calls,
        tally.failed,
        tally.worst.as_millis()
    );
    let _ = held.release().await;
    backend.close().await
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}
