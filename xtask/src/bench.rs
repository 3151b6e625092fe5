//! `cargo xtask bench [BACKEND...] [--quick]`: the services the named backends need up (or the
//! user's own, from SYNC_TEST_*), the `sync-bench` binary against them, the services down
//! again. The report lands in `<target>/bench/` (CARGO_TARGET_DIR honoured).

use std::{
    process::{Command, ExitCode},
    time::Instant,
};

use crate::{
    Result, fmt_duration, install, interrupted, project_root, services, services::Service,
    target_dir, total_elapsed,
};

/// Backends the bench knows.
const BACKENDS: [&str; 5] = ["etcd", "local", "ntp", "consul", "redis"];

/// The service a backend's scenarios run against, for the backends that have scenarios.
fn service_of(backend: &str) -> Option<Service> {
    match backend {
        "etcd" => Some(Service::Etcd),
        "consul" => Some(Service::Consul),
        "ntp" => Some(Service::Ntp),
        "redis" => Some(Service::Redis),
        _ => None,
    }
}

pub(crate) fn run(args: &[String]) -> Result<ExitCode> {
    let mut quick = false;
    let mut names: Vec<&str> = Vec::new();
    for arg in args {
        match arg.as_str() {
            "--quick" => quick = true,
            flag if flag.starts_with('-') => bail!("unknown flag `{flag}`\n{}", crate::USAGE),
            name => match BACKENDS.iter().find(|b| **b == name) {
                Some(b) => {
                    if !names.contains(b) {
                        names.push(b);
                    }
                }
                None => bail!("unknown backend `{name}` (etcd local ntp consul redis)"),
            },
        }
    }
    if names.is_empty() {
        names = BACKENDS.to_vec();
    }
    let mut managed = Vec::new();
    for service in names.iter().filter_map(|n| service_of(n)) {
        match std::env::var(service.env_var()) {
            Ok(value) if !value.is_empty() => say!(
                "{service}: using {}={value} from the environment (not started here)",
                service.env_var()
            ),
            _ => managed.push(service),
        }
    }
    // sync-bench links etcd-client, whose build script runs protoc.
    let started = services::up(&managed, &[install::PROTOC, install::PROTO_INCLUDES])?;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let envs: Vec<(&str, String)> = managed.iter().flat_map(|s| s.envs()).collect();
        bench(&names, quick, &envs)
    }))
    .unwrap_or_else(|_| Err("xtask panicked while benchmarking".into()));
    if !started.is_empty() {
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

/// Runs sync-bench for `backends` with `envs` (the SYNC_TEST_* of the services started here;
/// the user's own are inherited). `--quick` builds in the dev profile (it only keeps the
/// harness alive), a full run in release. Its exit status, as ours.
pub(crate) fn bench(backends: &[&str], quick: bool, envs: &[(&str, String)]) -> Result<ExitCode> {
    let out = target_dir().join("bench");
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    command.current_dir(project_root()).args(["run", "-q"]);
    if !quick {
        command.arg("--release");
    }
    command.args(["-p", "sync-bench", "--"]);
    if quick {
        command.arg("--quick");
    }
    command
        .arg("--out")
        .arg(&out)
        .args(backends)
        .envs(envs.iter().map(|(k, v)| (k, v)));
    let shown: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    say!("bench: cargo {}", shown.join(" "));
    let started = Instant::now();
    let status = crate::test::run_child(command)?;
    if interrupted() {
        bail!("interrupted");
    }
    let took = fmt_duration(started.elapsed());
    if !status.success() {
        say!("bench FAILED ({status}) after {took}");
        return Ok(crate::test::exit_code(status));
    }
    say!("bench done in {took}; report in {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// The backends `cargo xtask test` benches quickly after its tests: those of the backends it
/// tested (all of them for a whole-workspace run).
pub(crate) fn quick_backends(tested: &[&str]) -> Vec<&'static str> {
    BACKENDS
        .into_iter()
        .filter(|b| tested.is_empty() || tested.contains(b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_run_follows_the_tested_backends() {
        assert_eq!(quick_backends(&[]), BACKENDS.to_vec());
        assert_eq!(quick_backends(&["etcd", "redis"]), vec!["etcd", "redis"]);
        assert_eq!(quick_backends(&["local"]), vec!["local"]);
    }

    #[test]
    fn services_are_started_only_for_backends_with_scenarios() {
        assert_eq!(service_of("etcd"), Some(Service::Etcd));
        assert_eq!(service_of("ntp"), Some(Service::Ntp));
        assert_eq!(service_of("redis"), Some(Service::Redis));
        assert_eq!(service_of("consul"), Some(Service::Consul));
        assert_eq!(service_of("local"), None);
    }

    /// The bench crate xtask runs is in the workspace, under the name used here.
    #[test]
    fn sync_bench_is_a_member() {
        let manifest = std::fs::read_to_string(project_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("\"sync-bench\""));
        assert!(project_root().join("sync-bench/Cargo.toml").is_file());
    }
}
