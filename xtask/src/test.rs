//! `cargo xtask test`: services up, the tests against them, services down, whatever happens in
//! between; the tests' exit status is xtask's.

use std::{
    os::unix::process::{CommandExt, ExitStatusExt},
    process::{Command, ExitCode, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};

use crate::{
    Result, fmt_duration, install, interrupted, project_root, services, services::Service,
    total_elapsed,
};

pub(crate) fn run(args: &[String]) -> Result<ExitCode> {
    let mut keep = false;
    let mut names: Vec<&str> = Vec::new();
    let mut cargo_args: Vec<String> = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--keep" => keep = true,
            "--" => cargo_args.extend(rest.by_ref().cloned()),
            "local" => names.push("local"),
            flag if flag.starts_with('-') => bail!("unknown flag `{flag}`\n{}", crate::USAGE),
            // A backend may need several services: redis, a Redis and a Redis Cluster.
            name => match Service::ALL.into_iter().find(|s| s.backend() == name) {
                Some(service) if names.contains(&service.backend()) => {}
                Some(service) => names.push(service.backend()),
                None => bail!("unknown backend `{name}` (etcd consul redis ntp local)"),
            },
        }
    }

    let whole = names.is_empty();
    let wanted: Vec<Service> = if whole {
        Service::ALL.to_vec()
    } else {
        Service::ALL
            .into_iter()
            .filter(|s| names.contains(&s.backend()))
            .collect()
    };
    // A backend whose SYNC_TEST_* is already set is the user's own server: use it, start none.
    let mut managed = Vec::new();
    for service in wanted.iter().copied() {
        match std::env::var(service.env_var()) {
            Ok(value) if !value.is_empty() => {
                say!(
                    "{service}: using {}={value} from the environment (not started here)",
                    service.env_var()
                );
            }
            _ => managed.push(service),
        }
    }
    // Scope of the cargo runs: the whole workspace, or the named backends' crates.
    let scope: Vec<String> = if whole {
        vec!["--workspace".into()]
    } else {
        let mut scope = Vec::new();
        for name in &names {
            let krate = format!("sync-{name}");
            if workspace_has(&krate) {
                scope.extend(["-p".to_string(), krate]);
            } else {
                say!("{krate}: not in the workspace yet, no tests to run for `{name}`");
            }
        }
        scope
    };
    // The TLS tests (private servers with certificates they make) need sync-etcd's and
    // sync-redis's `tls` features. A whole-workspace run has them on, since syncctl's
    // sync-any asks for every backend (see `the_workspace_run_has_tls_on`); a run of named
    // backends gives them a step of their own.
    let own = OwnSteps {
        etcd_tls: !whole && wanted.contains(&Service::Etcd) && workspace_has("sync-etcd"),
        redis_tls: !whole && wanted.contains(&Service::Redis) && workspace_has("sync-redis"),
        consul: wanted.contains(&Service::Consul) && workspace_has("sync-consul"),
    };
    // etcd-client's build script runs protoc, also against a user's own etcd: installed by
    // `services::up`, in the same apt-get run as the services' own packages.
    let build_tools: &[install::Tool] = if wanted.contains(&Service::Etcd) {
        &[install::PROTOC, install::PROTO_INCLUDES]
    } else {
        &[]
    };

    // Only what this run starts is stopped at the end: services that were already up (from
    // `cargo xtask services up`) stay up.
    let since = Instant::now();
    if !managed.is_empty() {
        let names: Vec<&str> = managed.iter().map(|s| s.name()).collect();
        say!("services up: {}", names.join(" "));
    }
    let started = services::up(&managed, build_tools)?;
    if !managed.is_empty() {
        say!("services up in {}", fmt_duration(since.elapsed()));
    }
    // From here on, every way out goes through the teardown below.
    // A panic (an eprintln! to a closed stderr, say) must not skip it either.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        smoke_and_test(&managed, &scope, own, &cargo_args, &names)
    }))
    .unwrap_or_else(|_| Err("xtask panicked while testing".into()));

    let before: Vec<&str> = managed
        .iter()
        .filter(|s| !started.contains(s))
        .map(|s| s.name())
        .collect();
    if !before.is_empty() {
        say!("left running as found: {}", before.join(" "));
    }
    if keep {
        if !started.is_empty() {
            say!("--keep: left running; `cargo xtask services down` stops them");
        }
    } else if !started.is_empty() {
        let since = Instant::now();
        match services::down(&started) {
            Ok(()) => say!("services down in {}", fmt_duration(since.elapsed())),
            Err(err) => say!("warning: teardown: {err}"),
        }
    }
    let code = outcome?;
    say!("total {}", fmt_duration(total_elapsed()));
    Ok(code)
}

/// How long each drill (lock, leader, task and the cluster drills) inside `cargo xtask test` runs (`cargo xtask drill` runs
/// longer).
const DRILL_LENGTH: Duration = Duration::from_secs(12);

/// The Consul lock drill inside `cargo xtask test`: long enough for one stop past its 10 s
/// TTL (the first strike is a stop) and a kill; about 20 s in all.
const CONSUL_DRILL_LENGTH: Duration = Duration::from_secs(16);

/// The test threads of sync-consul's step: Consul's 10 s minimum session TTL makes each expiry
/// case of the conformance suite take ~20 s, so they must run at once to keep the whole run
/// short.
const CONSUL_TEST_THREADS: &str = "64";

/// The backends whose tests run in steps of their own, besides the workspace's.
#[derive(Clone, Copy)]
struct OwnSteps {
    /// sync-etcd's `tls` feature: its TLS tests.
    etcd_tls: bool,
    /// sync-redis's `tls` feature: its TLS tests.
    redis_tls: bool,
    /// Every sync-consul test target, with [`CONSUL_TEST_THREADS`].
    consul: bool,
}

fn smoke_and_test(
    managed: &[Service],
    scope: &[String],
    own: OwnSteps,
    cargo_args: &[String],
    tested: &[&str],
) -> Result<ExitCode> {
    if !managed.is_empty() {
        let started = Instant::now();
        services::smoke(managed)?;
        say!("smoke checks passed in {}", fmt_duration(started.elapsed()));
    }
    if scope.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let envs: Vec<(&str, String)> = managed
        .iter()
        .flat_map(|s| s.envs())
        .chain([("SYNC_REQUIRE_LIVE", "1".to_string())])
        .collect();
    // --all-targets skips doc tests and --doc runs only them, hence two runs; the second reuses
    // the first's build.
    let scope: Vec<&str> = scope.iter().map(String::as_str).collect();
    // sync-consul's targets are tested in their own step, below.
    let tests_scope = without_consul(&scope, own.consul);
    let mut steps: Vec<(&str, Vec<String>)> = Vec::new();
    if !tests_scope.is_empty() {
        let flags = [&tests_scope[..], &["--all-targets", "--no-fail-fast"]].concat();
        steps.push(("tests", cargo_line(&flags, cargo_args, &[])));
    }
    let flags = [&scope[..], &["--doc", "--no-fail-fast"]].concat();
    steps.push(("doc tests", cargo_line(&flags, cargo_args, &[])));
    // etcd over TLS and mutual TLS, and the conformance suite over mutual TLS.
    if own.etcd_tls {
        steps.push((
            "etcd TLS tests",
            cargo_line(&ETCD_TLS_TESTS, cargo_args, &[]),
        ));
    }
    // Redis over TLS and mutual TLS, against private TLS redis-servers.
    if own.redis_tls {
        steps.push((
            "redis TLS tests",
            cargo_line(&REDIS_TLS_TESTS, cargo_args, &[]),
        ));
    }
    // Every sync-consul target (lib, conformance, live…) with SYNC_TEST_CONSUL and
    // SYNC_TEST_CONSUL_ACL set (both in `envs`), many cases at once.
    if own.consul {
        let threads = ["--test-threads", CONSUL_TEST_THREADS];
        steps.push((
            "consul tests",
            cargo_line(&CONSUL_TESTS, cargo_args, &threads),
        ));
    }
    // Every step runs even when one fails (CI reports every failure); the first failure's
    // status is xtask's.
    let mut failed: Option<ExitCode> = None;
    if let Some(code) = check_alone() {
        failed.get_or_insert(code);
    }
    for (what, flags) in steps {
        let mut command = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
        command
            .current_dir(project_root())
            .arg("test")
            .args(flags)
            .envs(envs.iter().map(|(k, v)| (k, v)));
        let shown: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        say!("{what}: cargo {}", shown.join(" "));
        let started = Instant::now();
        let status = run_child(command)?;
        if interrupted() {
            bail!("interrupted");
        }
        let took = fmt_duration(started.elapsed());
        if !status.success() {
            say!("{what} FAILED ({status}) after {took}");
            failed.get_or_insert(exit_code(status));
            continue;
        }
        say!("{what} passed in {took}");
    }
    // Short drills on the live etcd and on a three-node cluster of their own: processes and
    // members killed and stopped for real.
    if let Some((_, url)) = envs.iter().find(|(var, _)| *var == Service::Etcd.env_var()) {
        let drills: [(&str, &dyn Fn() -> Result<ExitCode>); 2] = [
            ("multi-process drills on etcd", &|| {
                crate::drill::drill(url, DRILL_LENGTH)
            }),
            ("drills on a three-node etcd cluster", &|| {
                crate::drill::drill_cluster(DRILL_LENGTH)
            }),
        ];
        for (what, drill) in drills {
            if let Some(code) = run_drill(what, drill) {
                failed.get_or_insert(code);
            }
        }
    }
    // The lock drill on the Redis server: chaos on the workers, about DRILL_LENGTH. The other
    // Redis drills (cluster, restart, leader, task) are `cargo xtask drill redis`'s.
    if let Some((_, url)) = envs
        .iter()
        .find(|(var, _)| *var == Service::Redis.env_var())
    {
        let drill = || crate::drill::drill_lock(url, DRILL_LENGTH);
        if let Some(code) = run_drill("the lock drill on Redis", &drill) {
            failed.get_or_insert(code);
        }
    }
    // The lock drill on the Consul agent, likewise (TTL 10 s, stops of 12 s). The other Consul
    // drills (leader, task, restart) are `cargo xtask drill consul`'s.
    if let Some((_, url)) = envs
        .iter()
        .find(|(var, _)| *var == Service::Consul.env_var())
    {
        let drill = || crate::drill::drill_lock(url, CONSUL_DRILL_LENGTH);
        if let Some(code) = run_drill("the lock drill on Consul", &drill) {
            failed.get_or_insert(code);
        }
    }

    // The benchmark harness, quick, so that it cannot rot: it must run, and asserts nothing
    // about speed.
    let started = Instant::now();
    say!("quick benchmarks (cargo xtask bench --quick)");
    match crate::bench::bench(&crate::bench::quick_backends(tested), true, &envs) {
        Ok(code) if code == ExitCode::SUCCESS => {
            say!(
                "quick benchmarks ran in {}",
                fmt_duration(started.elapsed())
            );
        }
        Ok(code) => {
            failed.get_or_insert(code);
        }
        Err(e) => {
            say!("quick benchmarks FAILED: {e}");
            failed.get_or_insert(ExitCode::FAILURE);
        }
    }
    Ok(failed.unwrap_or(ExitCode::SUCCESS))
}

/// The crates users depend on one at a time: in the workspace their dependencies' features
/// are unified, so a feature one of them forgot to ask for goes unnoticed there.
const ALONE: [&str; 9] = [
    "sync-core",
    "sync-kit",
    "sync-local",
    "sync-etcd",
    "sync-redis",
    "sync-consul",
    "sync-ntp",
    "sync-cron",
    "sync-any",
];

/// `cargo check -p <crate>` for each of [`ALONE`]; the failure status, if one failed.
fn check_alone() -> Option<ExitCode> {
    let started = Instant::now();
    say!(
        "each crate on its own: cargo check -p <crate> for {}",
        ALONE.join(", ")
    );
    let mut failed = None;
    for krate in ALONE {
        let status = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
            .current_dir(project_root())
            .args(["check", "-q", "-p", krate])
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                say!("{krate} does not build on its own ({s})");
                failed.get_or_insert(exit_code(s));
            }
            Err(e) => {
                say!("cargo check -p {krate}: {e}");
                failed.get_or_insert(ExitCode::FAILURE);
            }
        }
    }
    if failed.is_none() {
        say!(
            "each crate built on its own in {}",
            fmt_duration(started.elapsed())
        );
    }
    failed
}

/// Runs one drill, saying how it went; its failure status, if it failed.
fn run_drill(what: &str, drill: &dyn Fn() -> Result<ExitCode>) -> Option<ExitCode> {
    let started = Instant::now();
    say!("drill: {what}");
    match drill() {
        Ok(code) if code == ExitCode::SUCCESS => {
            say!("drill passed in {}", fmt_duration(started.elapsed()));
            None
        }
        Ok(code) => {
            say!("drill FAILED after {}", fmt_duration(started.elapsed()));
            Some(code)
        }
        Err(e) => {
            say!("drill FAILED: {e}");
            Some(ExitCode::FAILURE)
        }
    }
}

/// The cargo test arguments of the etcd TLS step: only the targets that need the feature (the
/// rest of sync-etcd ran in the workspace step).
const ETCD_TLS_TESTS: [&str; 9] = [
    "-p",
    "sync-etcd",
    "--features",
    "tls",
    "--test",
    "tls",
    "--test",
    "conformance_tls",
    "--no-fail-fast",
];

/// The cargo test arguments of the Redis TLS step, like [`ETCD_TLS_TESTS`].
const REDIS_TLS_TESTS: [&str; 7] = [
    "-p",
    "sync-redis",
    "--features",
    "tls",
    "--test",
    "tls",
    "--no-fail-fast",
];

/// The cargo test arguments of the Consul step: every target of sync-consul.
const CONSUL_TESTS: [&str; 4] = ["-p", "sync-consul", "--all-targets", "--no-fail-fast"];

/// `scope` without sync-consul when it has a step of its own: `--workspace` excludes it, a
/// `-p sync-consul` goes. Empty when sync-consul was all there was.
fn without_consul<'a>(scope: &[&'a str], consul: bool) -> Vec<&'a str> {
    if !consul {
        return scope.to_vec();
    }
    if scope.contains(&"--workspace") {
        return [scope, &["--exclude", "sync-consul"]].concat();
    }
    let mut kept = Vec::new();
    let mut rest = scope.iter();
    while let Some(arg) = rest.next() {
        match (*arg, rest.clone().next()) {
            ("-p", Some(&"sync-consul")) => {
                rest.next();
            }
            _ => kept.push(*arg),
        }
    }
    if kept.contains(&"-p") {
        kept
    } else {
        Vec::new()
    }
}

/// A `cargo test` command line: `flags`, the user's `cargo_args` (what followed xtask's `--`),
/// and `test_args` for the test binaries merged into the user's own (after one `--`); a test
/// argument the user gave too is theirs, since libtest refuses one given twice.
fn cargo_line(flags: &[&str], cargo_args: &[String], test_args: &[&str]) -> Vec<String> {
    let split = cargo_args.iter().position(|a| a == "--");
    let (theirs, their_tests) = match split {
        Some(at) => (&cargo_args[..at], &cargo_args[at + 1..]),
        None => (cargo_args, &[][..]),
    };
    let mut line: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    line.extend(theirs.iter().cloned());
    let given = |flag: &str| {
        their_tests
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    let ours: Vec<&str> = match test_args.first() {
        Some(flag) if flag.starts_with("--") && given(flag) => Vec::new(),
        _ => test_args.to_vec(),
    };
    if !ours.is_empty() || split.is_some() {
        line.push("--".to_string());
    }
    line.extend(ours.iter().map(|a| a.to_string()));
    line.extend(their_tests.iter().cloned());
    line
}

/// A child's status as ours: its exit code, or 128 + the signal that ended it.
pub(crate) fn exit_code(status: ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    u8::try_from(code).map_or(ExitCode::FAILURE, ExitCode::from)
}

/// Runs a child in its own process group, streaming its output. An interrupt of xtask is
/// passed on to the whole group as SIGINT (SIGKILL if it lingers), so that the child is gone
/// before the teardown stops the services it is using.
pub(crate) fn run_child(mut command: Command) -> Result<ExitStatus> {
    command.stdin(Stdio::null()).process_group(0);
    let mut child = command.spawn()?;
    let group = Pid::from_raw(i32::try_from(child.id())?);
    let mut signalled: Option<Instant> = None;
    let mut killed = false;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if interrupted() {
            match signalled {
                None => {
                    let _ = signal::killpg(group, signal::Signal::SIGINT);
                    signalled = Some(Instant::now());
                }
                Some(at) if !killed && at.elapsed() > Duration::from_secs(10) => {
                    let _ = signal::killpg(group, signal::Signal::SIGKILL);
                    killed = true;
                }
                Some(_) => {}
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the workspace lists a member crate of that name (backend crates arrive over time).
fn workspace_has(krate: &str) -> bool {
    let root = project_root();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap_or_default();
    root.join(krate).join("Cargo.toml").is_file() && manifest.contains(&format!("\"{krate}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TLS step names test targets that sync-etcd has, behind its `tls` feature.
    #[test]
    fn the_etcd_tls_step_names_real_targets() {
        let manifest = std::fs::read_to_string(project_root().join("sync-etcd/Cargo.toml"))
            .expect("sync-etcd's manifest");
        assert!(manifest.contains("\ntls = ["), "no `tls` feature");
        for target in ETCD_TLS_TESTS
            .windows(2)
            .filter(|w| w[0] == "--test")
            .map(|w| w[1])
        {
            let entry =
                format!("name = \"{target}\"\nharness = false\nrequired-features = [\"tls\"]");
            assert!(manifest.contains(&entry), "no TLS test target {target}");
        }
    }

    /// A whole-workspace run tests TLS in the workspace step: sync-cli turns on sync-any's
    /// TLS features, which turn on sync-etcd's and sync-redis's `tls`.
    #[test]
    fn the_workspace_run_has_tls_on() {
        let manifest = std::fs::read_to_string(project_root().join("sync-cli/Cargo.toml"))
            .expect("sync-cli's manifest");
        assert!(workspace_has("sync-cli"), "sync-cli left the workspace");
        for feature in ["\"etcd-tls\"", "\"redis-tls\""] {
            assert!(
                manifest.contains(feature),
                "sync-cli's sync-any lacks {feature}"
            );
        }
    }

    /// sync-consul leaves the workspace step for its own, which names every target.
    #[test]
    fn consul_has_a_step_of_its_own() {
        let no = |s: &[&'static str]| without_consul(s, true);
        assert_eq!(
            no(&["--workspace"]),
            ["--workspace", "--exclude", "sync-consul"]
        );
        assert_eq!(
            no(&["-p", "sync-etcd", "-p", "sync-consul"]),
            ["-p", "sync-etcd"]
        );
        assert!(no(&["-p", "sync-consul"]).is_empty());
        assert_eq!(without_consul(&["--workspace"], false), ["--workspace"]);
        assert!(CONSUL_TESTS.contains(&"--all-targets"));
        let manifest = std::fs::read_to_string(project_root().join("sync-consul/Cargo.toml"))
            .expect("sync-consul's manifest");
        assert!(
            manifest.contains("name = \"conformance\""),
            "no conformance target"
        );
    }

    /// The Consul step's SYNC_TEST_* variables: both agents.
    #[test]
    fn the_consul_step_gets_both_agents() {
        let vars: Vec<&str> = Service::ALL
            .into_iter()
            .filter(|s| s.backend() == "consul")
            .flat_map(|s| s.envs())
            .map(|(var, _)| var)
            .collect();
        assert_eq!(vars, ["SYNC_TEST_CONSUL", "SYNC_TEST_CONSUL_ACL"]);
    }

    #[test]
    fn test_arguments_merge_with_the_users() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let threads = ["--test-threads", "64"];
        assert_eq!(
            cargo_line(&["-p", "x"], &[], &threads),
            ["-p", "x", "--", "--test-threads", "64"]
        );
        assert_eq!(
            cargo_line(
                &["-p", "x"],
                &args(&["--release", "--", "lock::"]),
                &threads
            ),
            [
                "-p",
                "x",
                "--release",
                "--",
                "--test-threads",
                "64",
                "lock::"
            ]
        );
        // The user's own thread count wins.
        assert_eq!(
            cargo_line(&["-p", "x"], &args(&["--", "--test-threads=1"]), &threads),
            ["-p", "x", "--", "--test-threads=1"]
        );
        // Without test arguments of ours, the user's line is passed on as it was.
        assert_eq!(
            cargo_line(&["-p", "x"], &args(&["-q"]), &[]),
            ["-p", "x", "-q"]
        );
        assert_eq!(
            cargo_line(&["-p", "x"], &args(&["--", "--nocapture"]), &[]),
            ["-p", "x", "--", "--nocapture"]
        );
    }

    #[test]
    fn the_childs_status_is_ours() {
        let code = |c: i32| exit_code(ExitStatus::from_raw(c << 8));
        assert_eq!(code(0), ExitCode::SUCCESS);
        assert_eq!(code(101), ExitCode::from(101));
        assert_eq!(code(1), ExitCode::FAILURE);
        // Killed by SIGKILL: 128 + 9.
        assert_eq!(exit_code(ExitStatus::from_raw(9)), ExitCode::from(137));
    }
}
