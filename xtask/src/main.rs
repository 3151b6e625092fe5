//! `cargo xtask`: the project's automation, in Rust rather than shell scripts (the
//! rust-analyzer model): run every test against live backends, and install, start, check and
//! stop those backends. Deliberately plain std plus two small crates, so that building it is
//! quick on a fresh machine.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// A progress line on stderr (stdout stays clean for `services env`, which is `eval`-ed).
macro_rules! say {
    ($($arg:tt)*) => { eprintln!("xtask: {}", format_args!($($arg)*)) };
}

macro_rules! bail {
    ($($arg:tt)*) => { return Err(format!($($arg)*).into()) };
}

mod bench;
mod drill;
mod install;
mod probe;
mod services;
mod test;

pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

const USAGE: &str = "\
usage:
  cargo xtask test [--keep] [BACKEND...] [-- CARGO_TEST_ARGS...]
      start the live backends, run the tests with SYNC_TEST_* and SYNC_REQUIRE_LIVE=1 set,
      stop the backends again (--keep leaves them running). Without BACKEND: every backend and
      the whole workspace; with BACKENDs (etcd consul redis ntp local): only those services and
      the tests of their sync-<BACKEND> crates (redis: a Redis and a Redis Cluster; consul:
      both Consul agents). sync-consul's tests run in a step of their own, every target with
      `-- --test-threads 64` (each Consul expiry case takes ~20 s) and SYNC_TEST_CONSUL and
      SYNC_TEST_CONSUL_ACL set. After the tests: short drills on etcd and a lock drill on
      Redis and one on Consul. A service whose SYNC_TEST_* variable is already set is used as it is, not
      started.
  cargo xtask services up|down|status|env|smoke [SERVICE...]
      SERVICE: etcd consul consul-acl redis redis-cluster ntp; default all. consul-acl is a
      second Consul dev agent on 18510 with ACLs on (default deny); SYNC_TEST_CONSUL_ACL
      carries its master token as `?token=`. redis gets an ACL user (SYNC_TEST_REDIS_ACL);
      redis-cluster is three masters on 13380-13382 (SYNC_TEST_REDIS_CLUSTER), formed with
      redis-cli.
      up: install what is missing, start on 127.0.0.1, wait until ready (twice is harmless)
      down: stop what `up` started; status: pid, port, health; env: SYNC_TEST_* lines to eval;
      smoke: one real write and read through each service.
  cargo xtask drill [etcd] [cluster] [task] [--seconds N | --minutes N]
      multi-process lock, leader and task drills on etcd (SYNC_TEST_ETCD's, or one started
      and stopped here), N seconds each (default 60): workers under kill -9 and SIGSTOP chaos
      writing fencing tokens; in the task drill they run keyed jobs submitted at a steady pace
      (the submitter is killed too), then drain the queue (at most 20-60 s more) and every
      job's status is checked: none lost, duplicated or stuck, re-runs only after a lost claim
      and with a higher token. Then, on a three-node cluster of its own: the lock drill while
      the leader is killed, while the whole cluster restarts, and a caller timing every call
      while one member at a time is frozen. `cluster` runs only those; `task` only the task
      drill (on the single etcd). A summary per drill;
      fails on any violation.
  cargo xtask drill redis [cluster | task | restart] [--seconds N | --minutes N]
      the lock, leader and task drills on Redis (SYNC_TEST_REDIS's, or one started and stopped
      here) and on the Redis Cluster (SYNC_TEST_REDIS_CLUSTER's, likewise); the task drill is
      skipped, saying so, while the backend lacks Task. Then the lock drill on a redis-server
      of its own, killed (-9) and restarted without persistence while a lock is held: overlaps
      until the old holder's next renewal are counted, a token that goes back or a write
      later than one TTL after the restart is a violation. `cluster`, `task`, `restart`: only
      those drills.
  cargo xtask drill consul [task | restart] [--seconds N | --minutes N]
      the drills on Consul with its shortest session TTL (10 s), no lock-delay, workers
      stopped for 12 s: the lock drill on the Consul agent (SYNC_TEST_CONSUL's, or one started
      and stopped here), then the leader and task drills, each skipped, saying so, while the
      backend lacks it (the task drill drains for at least 40 s). Then the lock drill on a
      Consul server of its own (-server -bootstrap-expect=1 with a data directory under
      target/drill/, its own ports), killed (-9) whenever a lock is held and restarted with
      its raft log: an overlap or a token not above the ones before the restart is a
      violation. `task`, `restart`: only those drills.
  cargo xtask bench [BACKEND...] [--quick]
      side-by-side benchmarks (sync-bench): each scenario runs the library, a raw client doing
      the minimal requests and the peer a user would otherwise pick, interleaved in rounds,
      against the live services (started and stopped here unless SYNC_TEST_* is set). BACKEND:
      etcd local ntp redis consul; default all.
      Prints a Markdown table; writes report.json, report.md and report.svg to
      <target>/bench/ (CARGO_TARGET_DIR honoured). --quick: a few seconds per scenario, dev
      build (`cargo xtask test` runs it after the tests); otherwise a release build.";

/// Ctrl-C, SIGTERM and SIGHUP only count here; whatever is running notices, stops its child
/// and tears down what it started. A second Ctrl-C gives up on the teardown.
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn interrupted() -> bool {
    INTERRUPTS.load(Ordering::SeqCst) > 0
}

fn main() -> ExitCode {
    let _ = START.set(Instant::now());
    let handler = ctrlc::set_handler(|| {
        if INTERRUPTS.fetch_add(1, Ordering::SeqCst) > 0 {
            eprintln!("xtask: interrupted twice, exiting without teardown");
            std::process::exit(130);
        }
        eprintln!("xtask: interrupted, cleaning up (Ctrl-C again to skip)");
    });
    if let Err(err) = handler {
        say!("warning: cannot catch Ctrl-C ({err}); an interrupted run may leave services up");
    }

    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(err) => {
            say!("error: {err}");
            if interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode> {
    match args.first().map(String::as_str) {
        Some("test") => test::run(&args[1..]),
        Some("services") => services::cli(&args[1..]),
        Some("drill") => drill::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        None | Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => bail!("unknown command `{other}`\n{USAGE}"),
    }
}

static START: OnceLock<Instant> = OnceLock::new();

/// Time since xtask started, for the closing line.
pub(crate) fn total_elapsed() -> Duration {
    START.get().map_or(Duration::ZERO, Instant::elapsed)
}

pub(crate) fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

pub(crate) fn project_root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory, honouring CARGO_TARGET_DIR like cargo does.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => project_root().join(dir),
        _ => project_root().join("target"),
    }
}

pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(1).map(|uid| uid == "0")
        })
        .unwrap_or(false)
}
