//! `sync-bench [--quick] [--out DIR] [BACKEND…]`: runs the scenarios of each backend (etcd,
//! local, ntp, consul, redis) and writes the report: a Markdown table on stdout,
//! `report.json`, `report.md` and `report.svg` under DIR (default `$CARGO_TARGET_DIR/bench`
//! or `target/bench`). Service URLs come from `SYNC_TEST_ETCD`, `SYNC_TEST_NTP`,
//! `SYNC_TEST_CONSUL` and `SYNC_TEST_REDIS`; `cargo xtask bench` sets them.
//! Exits 1 if a scenario failed (never because of a number).

#![deny(missing_docs)]

mod consul;
mod etcd;
mod local;
mod ntp;
mod redis;

use std::{
    future::Future,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sync_bench::report::{Report, Row, Skipped};

/// Errors of the harness itself: a message saying what failed.
pub(crate) type Result<T, E = String> = std::result::Result<T, E>;

/// `.or_msg("what")`: any displayable error as a message naming what was being done.
pub(crate) trait OrMsg<T> {
    fn or_msg(self, what: &str) -> Result<T>;
}

impl<T, E: std::fmt::Display> OrMsg<T> for std::result::Result<T, E> {
    fn or_msg(self, what: &str) -> Result<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// The run's sizes: `--quick` keeps every scenario to a few seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx {
    pub quick: bool,
    pub rounds: usize,
}

impl Ctx {
    /// `quick` or `full`.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick { quick } else { full }
    }
}

/// Backends the harness knows.
const BACKENDS: [&str; 5] = ["etcd", "local", "ntp", "consul", "redis"];

const USAGE: &str = "usage: sync-bench [--quick] [--out DIR] [--only WORD]... [BACKEND...]  (etcd local ntp consul redis; default all; --only runs the scenarios whose name holds WORD)";

/// The `--only` words: a scenario runs if its name holds one of them (all run when empty).
static ONLY: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

fn selected(name: &str) -> bool {
    let name = name.to_lowercase();
    ONLY.get()
        .is_none_or(|words| words.is_empty() || words.iter().any(|w| name.contains(w.as_str())))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        return match args.get(1).map(String::as_str) {
            Some("redis-held") => redis::child_main(&args[2..]),
            _ => etcd::child_main(&args[1..]),
        };
    }
    let mut quick = false;
    let mut out: Option<PathBuf> = None;
    let mut backends: Vec<String> = Vec::new();
    let mut only: Vec<String> = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => match it.next() {
                Some(dir) => out = Some(dir.into()),
                None => return usage("--out needs a directory"),
            },
            "--only" => match it.next() {
                Some(word) => only.push(word.to_lowercase()),
                None => return usage("--only needs a word of a scenario's name"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            flag if flag.starts_with('-') => return usage(&format!("unknown flag {flag}")),
            name if BACKENDS.contains(&name) => {
                if !backends.iter().any(|b| b == name) {
                    backends.push(name.to_string());
                }
            }
            name => return usage(&format!("unknown backend {name}")),
        }
    }
    let _ = ONLY.set(only);
    if backends.is_empty() {
        backends = BACKENDS.iter().map(|s| s.to_string()).collect();
    }
    let out = out.unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from("target"), PathBuf::from);
        target.join("bench")
    });
    let ctx = Ctx {
        quick,
        rounds: if quick { 2 } else { 3 },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sync-bench: cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let report = runtime.block_on(run(ctx, &backends));
    let md = report.markdown();
    println!("{md}");
    let written = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join("report.json"), report.json()))
        .and_then(|()| std::fs::write(out.join("report.md"), &md))
        .and_then(|()| std::fs::write(out.join("report.svg"), report.svg()));
    if let Err(e) = written {
        eprintln!("sync-bench: writing the report to {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    eprintln!(
        "sync-bench: report in {} (report.json, report.md, report.svg); {:.1}s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    if report.skipped.iter().any(|s| s.failed) {
        eprintln!("sync-bench: some scenarios FAILED (see \"Not run\")");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn usage(why: &str) -> ExitCode {
    eprintln!("sync-bench: {why}\n{USAGE}");
    ExitCode::from(2)
}

async fn run(ctx: Ctx, backends: &[String]) -> Report {
    let mut report = Report {
        quick: ctx.quick,
        profile: if cfg!(debug_assertions) {
            "debug".into()
        } else {
            "release".into()
        },
        rounds: ctx.rounds,
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        rows: Vec::new(),
        skipped: Vec::new(),
    };
    for backend in backends {
        match backend.as_str() {
            "etcd" => match env_url("SYNC_TEST_ETCD") {
                Some(url) => etcd::run(ctx, &url, &mut report).await,
                None => skip(&mut report, "etcd", "*", "SYNC_TEST_ETCD is not set"),
            },
            "ntp" => match env_url("SYNC_TEST_NTP") {
                Some(url) => ntp::run(ctx, &url, &mut report).await,
                None => skip(&mut report, "ntp", "*", "SYNC_TEST_NTP is not set"),
            },
            "consul" => match env_url("SYNC_TEST_CONSUL") {
                Some(url) => consul::run(ctx, &url, &mut report).await,
                None => skip(&mut report, "consul", "*", "SYNC_TEST_CONSUL is not set"),
            },
            "redis" => match env_url("SYNC_TEST_REDIS") {
                Some(url) => redis::run(ctx, &url, &mut report).await,
                None => skip(&mut report, "redis", "*", "SYNC_TEST_REDIS is not set"),
            },
            "local" => local::run(ctx, &mut report).await,
            // The extension point: a backend crate lands, and its module joins the ones above
            // with its raw client and peer.
            other => skip(
                &mut report,
                other,
                "*",
                &format!("no sync-{other} backend crate in the workspace yet"),
            ),
        }
    }
    report
}

fn env_url(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

fn skip(report: &mut Report, backend: &str, scenario: &str, reason: &str) {
    eprintln!("sync-bench: {backend} {scenario}: not run: {reason}");
    report.skipped.push(Skipped {
        backend: backend.into(),
        scenario: scenario.into(),
        reason: reason.into(),
        failed: false,
    });
}

/// Runs one scenario, timing it on stderr; its rows join the report, or its error is listed
/// as a failure.
pub(crate) async fn scenario<F>(report: &mut Report, backend: &str, name: &str, f: F)
where
    F: Future<Output = Result<Vec<Row>>>,
{
    if !selected(name) {
        return;
    }
    eprintln!("sync-bench: {backend} {name} …");
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(900), f).await {
        Ok(Ok(rows)) => {
            eprintln!(
                "sync-bench: {backend} {name}: done in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            report.rows.extend(rows);
        }
        Ok(Err(e)) => {
            eprintln!("sync-bench: {backend} {name}: FAILED: {e}");
            report.skipped.push(Skipped {
                backend: backend.into(),
                scenario: name.into(),
                reason: e,
                failed: true,
            });
        }
        Err(_) => {
            eprintln!("sync-bench: {backend} {name}: FAILED: timed out");
            report.skipped.push(Skipped {
                backend: backend.into(),
                scenario: name.into(),
                reason: "timed out after 900 s".into(),
                failed: true,
            });
        }
    }
}

/// A new random name, for namespaces and ids that no earlier run used.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
