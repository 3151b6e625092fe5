//! The same program on whatever backend a URL names:
//!
//! ```text
//! cargo run -p sync-any --example swap -- local://
//! cargo run -p sync-any --example swap -- etcd://127.0.0.1:12379/demo
//! ```
//!
//! It takes a lock twice (the fencing token must grow), wins an election and proclaims, runs a
//! job on a worker, swaps a map value with compare-and-swap, and reads the time — each only
//! where the backend has that primitive — and prints what happened, not backend-specific
//! numbers, so two backends tell the same story.

use std::{io::Write, process::ExitCode, sync::Arc, time::Duration};

use sync_core::{
    Backend, Capability, ElectOptions, ErrorKind, Job, JobContext, JobState, LockOptions,
    WorkerOptions,
};

#[tokio::main]
async fn main() -> ExitCode {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("usage: swap <backend url>, e.g. local:// or etcd://127.0.0.1:2379/demo");
        return ExitCode::FAILURE;
    };
    // A closed stdout (`| head`) ends the story's output, not the program with a panic.
    let say = |line: String| drop(writeln!(std::io::stdout(), "{line}"));
    match story(&url, say).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("swap: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the story on the backend `url` names, telling each step to `say`.
pub async fn story(url: &str, mut say: impl FnMut(String)) -> sync_core::Result<()> {
    let backend = sync_any::connect(url).await?;
    let caps = backend.capabilities().iter().map(|c| format!("{c:?}"));
    say(format!("connected: {}", caps.collect::<Vec<_>>().join(" ")));
    let run = uuid_like();
    let steps = [
        Capability::Lock,
        Capability::Leader,
        Capability::Task,
        Capability::Map,
        Capability::Time,
    ];
    for cap in steps {
        if !backend.capabilities().contains(cap) {
            say(format!("{cap:?}: not provided by this backend"));
            continue;
        }
        let lines = match cap {
            Capability::Lock => lock(&backend, &run).await?,
            Capability::Leader => leader(&backend, &run).await?,
            Capability::Task => task(&backend, &run).await?,
            Capability::Map => map(&backend, &run).await?,
            _ => time(&backend).await?,
        };
        lines.into_iter().for_each(&mut say);
    }
    backend.close().await?;
    say("closed".to_string());
    Ok(())
}

async fn lock(backend: &Arc<dyn Backend>, run: &str) -> sync_core::Result<Vec<String>> {
    let mut lines = Vec::new();
    let lock = backend.lock()?;
    let id = format!("orders-{run}");
    let first = lock.acquire(&id, LockOptions::new()).await?;
    let busy = lock.try_acquire(&id).await?.is_none();
    let token = first.fencing_token();
    first.release().await?;
    let wait = LockOptions::new().with_wait(Duration::from_secs(5));
    let second = lock.acquire(&id, wait).await?;
    lines.push(format!(
        "Lock: held; a second contender is refused: {busy}; the next grant's fencing token is higher: {}",
        second.fencing_token() > token
    ));
    second.release().await?;
    Ok(lines)
}

async fn leader(backend: &Arc<dyn Backend>, run: &str) -> sync_core::Result<Vec<String>> {
    let mut lines = Vec::new();
    let group = backend.leader(&format!("billing-{run}"))?;
    let elected = group.elect("node-1", ElectOptions::new()).await?;
    elected.proclaim(b"http://node-1:8080").await?;
    let seen = group.leader().await?;
    let agrees = seen.is_some_and(|l| {
        l.candidate == "node-1" && l.term == elected.term() && l.value == b"http://node-1:8080"
    });
    lines.push(format!(
        "Leader: node-1 elected; followers see it and its proclaimed address: {agrees}"
    ));
    elected.resign().await?;
    lines.push(format!(
        "Leader: node-1 resigned; the group has no leader: {}",
        group.leader().await?.is_none()
    ));
    Ok(lines)
}

async fn task(backend: &Arc<dyn Backend>, run: &str) -> sync_core::Result<Vec<String>> {
    let mut lines = Vec::new();
    let task = backend.task()?;
    let name = format!("shout-{run}");
    let worker = task
        .work(
            &name,
            Arc::new(|job: JobContext| async move { Ok(job.payload.to_ascii_uppercase()) }),
            WorkerOptions::new().with_concurrency(2),
        )
        .await?;
    let done = task.run(Job::new(&name, "hello")).await?;
    lines.push(format!(
        "Task: job ran once and succeeded: {}; output {:?}",
        done.state == JobState::Succeeded && done.attempts == 1,
        String::from_utf8_lossy(done.output.as_deref().unwrap_or_default())
    ));
    worker.stop().await;
    Ok(lines)
}

async fn map(backend: &Arc<dyn Backend>, run: &str) -> sync_core::Result<Vec<String>> {
    let mut lines = Vec::new();
    let map = backend.map(&format!("config-{run}"))?;
    let v1 = map.write("mode", b"blue").await?;
    let v2 = map.compare_and_swap("mode", Some(v1), b"green").await?;
    let stale = map.compare_and_swap("mode", Some(v1), b"red").await;
    let now = map.read("mode").await?.map(|e| e.value);
    lines.push(format!(
        "Map: blue -> green by compare-and-swap; a stale swap is a conflict: {}; value now {:?}; version grew: {}",
        stale.is_err_and(|e| e.kind() == ErrorKind::Conflict),
        now.map(|v| String::from_utf8_lossy(&v).into_owned()),
        v2 > v1
    ));
    map.delete("mode").await?;
    Ok(lines)
}

async fn time(backend: &Arc<dyn Backend>) -> sync_core::Result<Vec<String>> {
    let mut lines = Vec::new();
    let now = backend.time()?.now_interval().await?;
    let system = std::time::SystemTime::now();
    lines.push(format!(
        "Time: an interval that is not inverted: {}; it is within a second of this host's clock: {}",
        now.earliest() <= now.latest(),
        now.earliest() <= system + Duration::from_secs(1)
            && system <= now.latest() + Duration::from_secs(1)
    ));
    Ok(lines)
}

/// A short per-run suffix, so runs against a shared server never meet.
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}
