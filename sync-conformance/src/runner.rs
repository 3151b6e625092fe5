//! The libtest-style runner: one trial per case, gated on the backend's environment variable
//! and capabilities.

use std::{future::Future, process::ExitCode, sync::Arc, time::Duration};

use futures::{FutureExt, future::BoxFuture};
use libtest_mimic::{Arguments, Failed, Trial};
use sync_core::{Backend, Capabilities, Capability};

use crate::{CaseResult, Ctx};

/// Connects a new client of the backend under test: `(url, namespace)`.
pub(crate) type Connect =
    dyn Fn(String, String) -> BoxFuture<'static, sync_core::Result<Arc<dyn Backend>>> + Send + Sync;

/// How the cases reach the backend under test, and what a probe client said of it.
pub(crate) struct Harness {
    pub(crate) connect: Box<Connect>,
    /// The backend URL from the environment (empty for the local backend).
    pub(crate) url: String,
    pub(crate) capabilities: Capabilities,
    /// The lease TTL; time bounds in cases scale with it.
    pub(crate) ttl: Duration,
}

/// The bound cases scale with when the backend has no lease (NTP).
const NO_LEASE_TTL: Duration = Duration::from_secs(1);

/// One behaviour case: where it belongs, what it needs, and how to run it.
#[derive(Clone, Copy)]
pub struct Case {
    /// The primitive (module) it tests, e.g. `lock`.
    pub primitive: &'static str,
    /// The case name, e.g. `mutual_exclusion`.
    pub name: &'static str,
    /// What the backend must support for the case to be meaningful.
    pub needs: &'static [Capability],
    /// Whether the case puts a fault proxy between a client and the server (network backends
    /// only: it needs a backend URL with a host).
    pub network: bool,
    /// The case itself.
    pub run: for<'a> fn(&'a Ctx) -> BoxFuture<'a, CaseResult>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("primitive", &self.primitive)
            .field("name", &self.name)
            .field("needs", &self.needs)
            .finish_non_exhaustive()
    }
}

macro_rules! case {
    ($module:ident :: $name:ident, [$($cap:ident),* $(,)?]) => {
        case!(@ $module::$name, [$($cap),*], false)
    };
    (network $module:ident :: $name:ident, [$($cap:ident),* $(,)?]) => {
        case!(@ $module::$name, [$($cap),*], true)
    };
    (@ $module:ident :: $name:ident, [$($cap:ident),*], $network:expr) => {
        Case {
            primitive: stringify!($module),
            name: stringify!($name),
            needs: &[$(Capability::$cap),*],
            network: $network,
            run: |ctx| Box::pin(crate::$module::$name(ctx)),
        }
    };
}

/// Every case of the suite, in report order.
pub fn cases() -> Vec<Case> {
    vec![
        case!(lock::mutual_exclusion, [Lock]),
        case!(lock::try_acquire_when_held, [Lock]),
        case!(lock::wait_timeout, [Lock]),
        case!(lock::handoff_on_release, [Lock]),
        case!(lock::fencing_tokens_increase, [Lock]),
        case!(lock::holder_names_the_token, [Lock]),
        case!(lock::lost_on_lease_revoke, [Lock, RevokeSession]),
        case!(lock::dead_holder_expires_after_ttl, [Lock, KillClient]),
        case!(lock::drop_releases, [Lock]),
        case!(lock::cancelled_acquire_leaves_nothing, [Lock]),
        case!(lock::cancelled_waiter_in_queue, [Lock]),
        case!(lock::same_handle_tasks_exclude, [Lock]),
        case!(lock::ids_do_not_collide, [Lock]),
        case!(lock::invalid_ids_rejected, [Lock]),
        case!(lock::release_not_held, [Lock]),
        case!(lock::one_span_per_operation, [Lock]),
        case!(lock::release_after_revoke, [Lock, RevokeSession]),
        case!(pause::paused_holder_sees_loss_first, [Lock, Leader]),
        case!(limits::duration_max_waits_never_panic, [Lock, Leader, Task]),
        case!(network fault::frozen_holder_loses_before_another_grant, [Lock]),
        case!(network fault::lost_guard_holds_up_no_one, [Lock]),
        case!(network fault::frozen_endpoint_fails_calls_in_bounded_time, [Map]),
        case!(network fault::waiter_rides_out_an_outage, [Lock]),
        case!(network fault::ambiguous_swap_is_resolved, [Map]),
        case!(leader::single_leader, [Leader]),
        case!(leader::resign_hands_over, [Leader]),
        case!(leader::revoked_on_lease_revoke, [Leader, RevokeSession]),
        case!(leader::follow_sees_changes, [Leader]),
        case!(leader::terms_increase, [Leader]),
        case!(leader::proclaim_visible_to_followers, [Leader]),
        case!(leader::leader_reports_current, [Leader]),
        case!(leader::one_span_per_operation, [Leader, Lock]),
        case!(task::pool_bounds_concurrency, [Task]),
        case!(task::run_returns_outcome, [Task]),
        case!(task::retries_until_max_attempts, [Task]),
        case!(task::redelivery_after_worker_death, [Task, KillClient]),
        case!(task::status_reports_attempts_and_error, [Task]),
        case!(task::output_over_limit_fails, [Task]),
        case!(task::idempotent_submit, [Task]),
        case!(task::handler_sees_claim_loss, [Task, RevokeSession]),
        case!(task::finished_jobs_disappear_after_retention, [Task]),
        case!(task::one_span_per_operation, [Task]),
        case!(network task::ambiguous_claim_neither_loses_nor_strands_the_job, [Task]),
        case!(map::crud, [Map]),
        case!(map::compare_and_swap_conflict, [Map]),
        case!(map::concurrent_update_exact, [Map]),
        case!(map::iterate_writes_back_changes, [Map]),
        case!(map::iterate_holds_no_locks, [Map]),
        case!(map::one_span_per_operation, [Map]),
        case!(
            cron::one_fire_per_tick_across_instances,
            [Leader, Task, Map]
        ),
        case!(
            cron::failover_resumes_next_tick,
            [Leader, Task, Map, KillClient]
        ),
        case!(cron::one_shot_fires_once, [Leader, Task, Map]),
        case!(time::now_within_bound, [Time]),
        case!(time::interval_contains_system_time, [Time]),
        case!(time::interval_never_inverted, [Time]),
    ]
}

/// Test threads when the user gave none: cases mostly wait, so run many at once.
const DEFAULT_TEST_THREADS: usize = 8;

/// What the environment allows.
enum Gate {
    /// Run the cases against this harness.
    Ready(Arc<Harness>),
    /// The endpoint variable is unset: show the cases as ignored; fail them if forced.
    Skip(String),
    /// Fail every case with this message.
    Fail(String),
}

/// Runs every case against one backend, libtest-style (cargo's filters, `--list`,
/// `--ignored`, `--include-ignored`, `--test-threads` work), and returns the exit code.
///
/// Trials are named `<backend>::<primitive>::<case>`. `connect(url, namespace)` makes one new
/// client of the backend whose keys live under `namespace`. With `env_var` set (e.g.
/// `Some("SYNC_TEST_ETCD")`), `url` is the variable's value, a backend URL; while it is unset
/// every case is ignored, or fails naming the variable when `SYNC_REQUIRE_LIVE=1`. With `None`
/// (the local backend) `url` is empty and the cases always run. One probe client, connected
/// first, tells the backend's capabilities and lease TTL; a case needing a capability the
/// backend lacks is ignored with kind `unsupported`, and fails if forced to run.
pub fn run<F, Fut, B>(backend: &'static str, env_var: Option<&'static str>, connect: F) -> ExitCode
where
    F: Fn(String, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = sync_core::Result<B>> + Send + 'static,
    B: Backend,
{
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        let from_env = std::env::var("RUST_TEST_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n: &usize| *n > 0);
        args.test_threads = Some(from_env.unwrap_or(DEFAULT_TEST_THREADS));
    }

    let gate = gate(backend, env_var, connect);
    let trials = cases()
        .into_iter()
        .map(|case| trial(backend, &gate, case))
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

fn gate<F, Fut, B>(backend: &'static str, env_var: Option<&'static str>, connect: F) -> Gate
where
    F: Fn(String, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = sync_core::Result<B>> + Send + 'static,
    B: Backend,
{
    let url = match env_var {
        None => String::new(),
        Some(var) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
            _ => {
                let require = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
                let why = format!(
                    "{var} is not set: the {backend} cases need a live endpoint \
                     (`cargo xtask services up` starts one; `cargo xtask services env` prints it)"
                );
                return if require {
                    Gate::Fail(format!("SYNC_REQUIRE_LIVE=1 but {why}"))
                } else {
                    Gate::Skip(why)
                };
            }
        },
    };
    let connect: Box<Connect> = Box::new(move |url, namespace| {
        let client = connect(url, namespace);
        async move { Ok(Arc::new(client.await?) as Arc<dyn Backend>) }.boxed()
    });
    match probe(&connect, &url) {
        Ok((capabilities, ttl)) => Gate::Ready(Arc::new(Harness {
            connect,
            url,
            capabilities,
            ttl: ttl.unwrap_or(NO_LEASE_TTL),
        })),
        Err(e) => Gate::Fail(format!("could not connect the {backend} probe client: {e}")),
    }
}

/// Connects one client to learn the backend's capabilities and TTL, then closes it.
fn probe(connect: &Connect, url: &str) -> sync_core::Result<(Capabilities, Option<Duration>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            sync_core::Error::new(sync_core::ErrorKind::Backend, "building a tokio runtime")
                .with_source(e)
        })?;
    rt.block_on(async {
        let client = connect(url.to_string(), "conformance-probe".to_string()).await?;
        let found = (client.capabilities(), client.ttl());
        client.close().await?;
        Ok(found)
    })
}

fn trial(backend: &'static str, gate: &Gate, case: Case) -> Trial {
    let name = format!("{backend}::{}::{}", case.primitive, case.name);
    match gate {
        Gate::Skip(why) => {
            let why = why.clone();
            Trial::test(name, move || Err(why.into())).with_ignored_flag(true)
        }
        Gate::Fail(why) => {
            let why = why.clone();
            Trial::test(name, move || Err(why.into()))
        }
        Gate::Ready(harness) => {
            let missing: Vec<Capability> = case
                .needs
                .iter()
                .copied()
                .filter(|c| !harness.capabilities.contains(*c))
                .collect();
            let no_server = case.network && crate::proxy::hosts(&harness.url).is_none();
            if !missing.is_empty() || no_server {
                // Forced with --include-ignored, an unsupported case fails: never a silent pass.
                let why = match no_server {
                    true => format!("unsupported: the {backend} backend has no server to proxy"),
                    false => format!("unsupported: the {backend} harness lacks {missing:?}"),
                };
                return Trial::test(name, move || Err(why.into()))
                    .with_kind("unsupported")
                    .with_ignored_flag(true);
            }
            let harness = harness.clone();
            Trial::test(name, move || run_case(harness, case))
        }
    }
}

/// A hang fails the trial instead of blocking CI; the bound leaves room for the slowest
/// TTL-scaled waits (several expiries in a row).
fn overall_timeout(ttl: Duration) -> Duration {
    Duration::from_secs(60) + ttl * 8
}

fn run_case(harness: Arc<Harness>, case: Case) -> Result<(), Failed> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("building the tokio runtime: {e}"))?;
    let limit = overall_timeout(harness.ttl);
    let ctx = Ctx::new(harness);
    let namespace = ctx.namespace().to_string();
    // Spawned, so a case that blocks its thread still lets the timeout fire on the other worker.
    let outcome = rt.block_on(async move {
        let handle = tokio::spawn(async move { (case.run)(&ctx).await });
        tokio::time::timeout(limit, handle).await
    });
    // Tasks a case leaves behind (a handler blocked forever) must not hold up the next trial.
    rt.shutdown_timeout(Duration::from_secs(1));
    let result = match outcome {
        Ok(Ok(Ok(()))) => return Ok(()),
        Ok(Ok(Err(failure))) => failure.to_string(),
        Ok(Err(join)) if join.is_panic() => {
            let payload = join.into_panic();
            format!(
                "case panicked: {}",
                sync_kit::panic_message(payload.as_ref())
            )
        }
        Ok(Err(join)) => format!("case task ended: {join}"),
        Err(_) => format!("case did not finish within {limit:?} (a hang)"),
    };
    Err(format!("{result}\n  namespace: {namespace}").into())
}
