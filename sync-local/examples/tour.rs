//! A tour of every primitive on the in-process backend: `cargo run -p sync-local --example tour`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use sync_core::{Backend, ElectOptions, Job, JobContext, LockOptions, Result, WorkerOptions};
use sync_cron::{Cron, Schedule};
use sync_local::{Cluster, Config};

#[tokio::main]
async fn main() -> Result<()> {
    let cluster = Cluster::new();
    let config = Config::default().with_ttl(Duration::from_secs(1));
    let alice = cluster.client(config.clone())?;
    let bob = cluster.client(config)?;

    lock(&alice, &bob).await?;
    leader(&alice, &bob).await?;
    task(&alice, &bob).await?;
    map(&alice, &bob).await?;
    cron(&alice).await?;
    time(&alice).await?;
    Ok(())
}

async fn lock(alice: &sync_local::Client, bob: &sync_local::Client) -> Result<()> {
    println!("== Lock: two contenders for \"invoice-42\"");
    let (a, b) = (alice.lock()?, bob.lock()?);
    let first = a.acquire("invoice-42", LockOptions::new()).await?;
    println!("  alice holds it, fencing token {}", first.fencing_token());
    let waiting = tokio::spawn(async move {
        b.acquire(
            "invoice-42",
            LockOptions::new().with_wait(Duration::from_secs(5)),
        )
        .await
    });
    first.release().await?;
    let second = waiting.await.expect("bob's task")?;
    println!(
        "  alice released; bob was handed the lock, fencing token {} (larger, so stale writes can be refused)",
        second.fencing_token()
    );
    second.release().await
}

async fn leader(alice: &sync_local::Client, bob: &sync_local::Client) -> Result<()> {
    println!("== Leader: election in group \"schedulers\"");
    let (a, b) = (alice.leader("schedulers")?, bob.leader("schedulers")?);
    let mut follow = b.follow().await?;
    let elected = a.elect("alice", ElectOptions::new()).await?;
    elected.proclaim(b"alice:8080").await?;
    let bob_campaign = tokio::spawn(async move { b.elect("bob", ElectOptions::new()).await });
    while let Some(Ok(seen)) = follow.next().await {
        if let Some(info) = seen.filter(|i| !i.value.is_empty()) {
            let value = String::from_utf8_lossy(&info.value);
            println!(
                "  follower sees leader {} (term {}) at {value}",
                info.candidate, info.term
            );
            break;
        }
    }
    elected.resign().await?;
    let bob_elected = bob_campaign.await.expect("bob's task")?;
    println!(
        "  alice resigned; {} leads now with term {}",
        bob_elected.candidate(),
        bob_elected.term()
    );
    bob_elected.resign().await
}

async fn task(alice: &sync_local::Client, bob: &sync_local::Client) -> Result<()> {
    println!("== Task: a job on a pool of 4, failing once before it succeeds");
    let tries = Arc::new(AtomicU32::new(0));
    let handler = {
        let tries = tries.clone();
        move |job: JobContext| {
            let tries = tries.clone();
            async move {
                if tries.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err("warehouse API timed out".into());
                }
                Ok(format!("shipped {}", String::from_utf8_lossy(&job.payload)).into_bytes())
            }
        }
    };
    let _worker = bob
        .task()?
        .work(
            "ship",
            Arc::new(handler),
            WorkerOptions::new().with_concurrency(4),
        )
        .await?;
    let job = Job::new("ship", "order-7").with_backoff(Duration::from_millis(50));
    let status = alice.task()?.run(job).await?;
    println!(
        "  {:?} after {} attempts (first error: {}), output {:?}",
        status.state,
        status.attempts,
        status.last_error.as_deref().unwrap_or("none"),
        String::from_utf8_lossy(status.output.as_deref().unwrap_or_default())
    );
    Ok(())
}

async fn map(alice: &sync_local::Client, bob: &sync_local::Client) -> Result<()> {
    println!("== Map: 2 clients x 4 tasks x 25 increments of one counter, no lock");
    let mut tasks = Vec::new();
    for client in [alice, bob] {
        for _ in 0..4 {
            let map = client.map("stats")?;
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    map.update("visits", |old| {
                        let n: u64 = old
                            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                            .unwrap_or(0);
                        (n + 1).to_string().into_bytes()
                    })
                    .await?;
                }
                Ok::<_, sync_core::Error>(())
            }));
        }
    }
    for t in tasks {
        t.await.expect("update task")?;
    }
    let entry = alice.map("stats")?.read("visits").await?.expect("written");
    println!(
        "  visits = {} at version {} (compare-and-swap retried every lost race)",
        String::from_utf8_lossy(&entry.value),
        entry.version
    );
    Ok(())
}

async fn cron(alice: &sync_local::Client) -> Result<()> {
    println!("== Cron: every 200 ms, fired by the leader only");
    let (fired_tx, mut fired_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |job: JobContext| {
        let fired_tx = fired_tx.clone();
        async move {
            let _ = fired_tx.send(job.labels);
            Ok(Vec::new())
        }
    };
    let task = alice.task()?;
    let _worker = task
        .work("report", Arc::new(handler), WorkerOptions::new())
        .await?;
    let cron = Cron::new(alice.leader("cron")?, task, alice.map("cron")?, "alice");
    cron.schedule(
        "nightly-report",
        Schedule::every(Duration::from_millis(200)),
        Job::new("report", ""),
    )
    .await?;
    for _ in 0..2 {
        if let Some(labels) = fired_rx.recv().await {
            println!(
                "  fired tick {} under leader term {}",
                labels.get("cron.tick").map_or("?", String::as_str),
                labels.get("cron.term").map_or("?", String::as_str)
            );
        }
    }
    cron.stop().await;
    Ok(())
}

async fn time(alice: &sync_local::Client) -> Result<()> {
    println!("== Time: an interval that contains true time");
    let now = alice.time()?.now_interval().await?;
    let since = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    println!(
        "  earliest {:?}, latest {:?} since the epoch (width {:?}, configurable)",
        since(now.earliest()),
        since(now.latest()),
        now.width()
    );
    Ok(())
}
