//! Interoperability with etcd's own `concurrency.Mutex` and `concurrency.Election`, through
//! the real `etcdctl lock` / `etcdctl elect` (etcdctl 3.4), on the empty namespace.
//! Needs `SYNC_TEST_ETCD` and `etcdctl` on the PATH.

mod common;

use std::{fmt::Debug, future::Future, process::Stdio, time::Duration};

use common::{TestFn, TestResult};
use sync_core::{Backend, ElectOptions, ErrorKind, LockOptions};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
};

/// A client on the empty namespace: etcd's own key layout.
async fn client(endpoint: &str) -> Result<sync_etcd::Client, String> {
    common::connect(endpoint, "").await
}

fn unique(what: &str) -> String {
    common::unique("interop", what)
}

struct Etcdctl {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Etcdctl {
    fn spawn(endpoint: &str, args: &[&str]) -> Result<Etcdctl, String> {
        let mut child = common::etcdctl(endpoint)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawning etcdctl: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        Ok(Etcdctl {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next line printed, within `limit` (None if nothing was printed in time).
    async fn line(&mut self, limit: Duration) -> Result<Option<String>, String> {
        match tokio::time::timeout(limit, self.lines.next_line()).await {
            Err(_) => Ok(None),
            Ok(Ok(Some(line))) => Ok(Some(line)),
            Ok(Ok(None)) => Err("etcdctl exited".into()),
            Ok(Err(e)) => Err(format!("reading etcdctl: {e}")),
        }
    }

    /// SIGTERM, so etcdctl unlocks / resigns and closes its session, then waits for it.
    async fn terminate(mut self) -> TestResult {
        if let Some(pid) = self.child.id() {
            // The shell's own `kill`: no procps needed.
            Command::new("sh")
                .args(["-c", &format!("kill -TERM {pid}")])
                .status()
                .await
                .map_err(|e| format!("kill: {e}"))?;
        }
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .map_err(|_| "etcdctl did not exit after SIGTERM".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// etcdctl lock and elect print the key they own: `<name>/<lease-hex>`.
fn check_key(printed: &str, name: &str) -> TestResult {
    if !printed.starts_with(&format!("{name}/")) {
        return Err(format!("etcdctl printed {printed:?}"));
    }
    Ok(())
}

/// While `ctl` holds `what`, a bounded `attempt` (given its wait) times out, and a longer one
/// is still waiting after 300 ms (a window in which it must not finish); once `ctl` lets go,
/// that one gets it.
async fn library_waits_for_etcdctl<T: Debug, Fut>(
    ctl: Etcdctl,
    what: &str,
    attempt: impl Fn(Duration) -> Fut,
) -> Result<T, String>
where
    Fut: Future<Output = sync_core::Result<T>>,
{
    match attempt(Duration::from_millis(500)).await {
        Err(e) if e.kind() == ErrorKind::Timeout => {}
        other => return Err(format!("{what} while etcdctl holds it: {other:?}")),
    }
    let mut waiter = Box::pin(attempt(Duration::from_secs(10)));
    if tokio::time::timeout(Duration::from_millis(300), &mut waiter)
        .await
        .is_ok()
    {
        return Err(format!("a waiting {what} finished while etcdctl held it"));
    }
    ctl.terminate().await?;
    waiter
        .await
        .map_err(|e| format!("{what} after etcdctl let go: {e}"))
}

/// `etcdctl <args>` does not get `name` while the library holds it (1.5 s in which it must
/// print nothing), and gets it within 5 s of `let_go`.
async fn etcdctl_waits_for_library(
    endpoint: &str,
    name: &str,
    args: &[&str],
    let_go: impl Future<Output = TestResult>,
) -> TestResult {
    let mut ctl = Etcdctl::spawn(endpoint, args)?;
    if let Some(line) = ctl.line(Duration::from_millis(1500)).await? {
        return Err(format!(
            "etcdctl {args:?} got what the library holds: {line}"
        ));
    }
    let_go.await?;
    let key = ctl
        .line(Duration::from_secs(5))
        .await?
        .ok_or_else(|| format!("etcdctl {args:?} did not get it after the library let go"))?;
    check_key(&key, name)?;
    ctl.terminate().await
}

/// `etcdctl lock NAME` holds: the library cannot take NAME until etcdctl lets go.
async fn etcdctl_lock_excludes_library(endpoint: String) -> TestResult {
    let name = unique("lock");
    let mut ctl = Etcdctl::spawn(&endpoint, &["lock", &name])?;
    let key = ctl
        .line(Duration::from_secs(10))
        .await?
        .ok_or("etcdctl lock did not acquire")?;
    check_key(&key, &name)?;
    let lock = client(&endpoint).await?.lock().map_err(|e| e.to_string())?;
    if lock
        .try_acquire(&name)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err("try_acquire got a lock etcdctl holds".into());
    }
    let guard = library_waits_for_etcdctl(ctl, "acquire", |wait| {
        lock.acquire(&name, LockOptions::new().with_wait(wait))
    })
    .await?;
    guard.release().await.map_err(|e| e.to_string())
}

/// The library holds NAME: `etcdctl lock NAME` does not get it until the guard is released.
async fn library_lock_excludes_etcdctl(endpoint: String) -> TestResult {
    let name = unique("lock");
    let lock = client(&endpoint).await?.lock().map_err(|e| e.to_string())?;
    let guard = lock
        .acquire(&name, LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    etcdctl_waits_for_library(&endpoint, &name, &["lock", &name], async {
        guard.release().await.map_err(|e| e.to_string())
    })
    .await
}

/// `etcdctl elect NAME PROPOSAL` leads: the library sees it as leader and is not elected
/// until etcdctl resigns.
async fn etcdctl_elect_excludes_library(endpoint: String) -> TestResult {
    let name = unique("elect");
    let mut ctl = Etcdctl::spawn(&endpoint, &["elect", &name, "from-etcdctl"])?;
    ctl.line(Duration::from_secs(10))
        .await?
        .ok_or("etcdctl elect was not elected")?;
    let c = client(&endpoint).await?;
    let leader = c.leader(&name).map_err(|e| e.to_string())?;
    let current = leader.leader().await.map_err(|e| e.to_string())?;
    match &current {
        Some(info) if info.value == b"from-etcdctl" && info.candidate == "from-etcdctl" => {}
        other => return Err(format!("leader() while etcdctl leads: {other:?}")),
    }
    let elected = library_waits_for_etcdctl(ctl, "elect", |wait| {
        leader.elect("lib", ElectOptions::new().with_wait(wait))
    })
    .await?;
    let term = current.map(|i| i.term).unwrap_or_default();
    if elected.term() <= term {
        return Err(format!("term went from {term} to {}", elected.term()));
    }
    elected.resign().await.map_err(|e| e.to_string())
}

/// The library leads NAME: `etcdctl elect NAME` is not elected until the library resigns.
async fn library_elect_excludes_etcdctl(endpoint: String) -> TestResult {
    let name = unique("elect");
    let c = client(&endpoint).await?;
    let elected = c
        .leader(&name)
        .map_err(|e| e.to_string())?
        .elect("lib", ElectOptions::new().with_value(b"lib-value".to_vec()))
        .await
        .map_err(|e| e.to_string())?;
    etcdctl_waits_for_library(&endpoint, &name, &["elect", &name, "from-etcdctl"], async {
        elected.resign().await.map_err(|e| e.to_string())
    })
    .await
}

fn main() -> std::process::ExitCode {
    let tests: [(&'static str, TestFn); 4] = [
        ("interop::etcdctl_lock_excludes_library", |e| {
            Box::pin(etcdctl_lock_excludes_library(e))
        }),
        ("interop::library_lock_excludes_etcdctl", |e| {
            Box::pin(library_lock_excludes_etcdctl(e))
        }),
        ("interop::etcdctl_elect_excludes_library", |e| {
            Box::pin(etcdctl_elect_excludes_library(e))
        }),
        ("interop::library_elect_excludes_etcdctl", |e| {
            Box::pin(library_elect_excludes_etcdctl(e))
        }),
    ];
    common::run(&tests, libtest_mimic::Arguments::from_args())
}
