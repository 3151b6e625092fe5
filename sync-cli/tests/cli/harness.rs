//! The runner: one libtest-mimic trial per case, gated on the live service it needs, each on
//! its own tokio runtime and under an overall time limit.

use std::{future::Future, pin::Pin, process::ExitCode, time::Duration};

use libtest_mimic::{Arguments, Trial};

pub type TestResult = Result<(), String>;
type BoxedTest = Pin<Box<dyn Future<Output = TestResult> + Send>>;

/// No case may run longer (each backend's whole set is meant to finish in ~40 s).
const TEST_LIMIT: Duration = Duration::from_secs(60);
/// The cases mostly wait on processes, not the CPU: the slow ones run at once.
const DEFAULT_THREADS: usize = 16;

/// A live service a case needs, named by the variable that holds its URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Live {
    Etcd,
    Redis,
    RedisCluster,
    Consul,
    Ntp,
}

impl Live {
    /// The name in test names: `lock::six_loops_never_overlap::<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Live::Etcd => "etcd",
            Live::Redis => "redis",
            Live::RedisCluster => "redis_cluster",
            Live::Consul => "consul",
            Live::Ntp => "ntp",
        }
    }

    fn var(self) -> &'static str {
        match self {
            Live::Etcd => "SYNC_TEST_ETCD",
            Live::Redis => "SYNC_TEST_REDIS",
            Live::RedisCluster => "SYNC_TEST_REDIS_CLUSTER",
            Live::Consul => "SYNC_TEST_CONSUL",
            Live::Ntp => "SYNC_TEST_NTP",
        }
    }

    fn url(self) -> Option<String> {
        let url = std::env::var(self.var()).ok()?;
        Some(url.trim().to_string()).filter(|u| !u.is_empty())
    }
}

/// One test: a name, the service it needs (if any), and the test, given that service's URL.
pub struct Case {
    name: String,
    needs: Option<Live>,
    test: Box<dyn FnOnce(String) -> BoxedTest + Send>,
}

impl Case {
    /// A case of the live `needs`: `test` gets the URL its variable holds.
    pub fn live<F, Fut>(name: String, needs: Live, test: F) -> Case
    where
        F: FnOnce(String) -> Fut + Send + 'static,
        Fut: Future<Output = TestResult> + Send + 'static,
    {
        Case {
            name,
            needs: Some(needs),
            test: Box::new(move |url| Box::pin(test(url))),
        }
    }

    /// A case that needs no live service: it always runs.
    pub fn offline<F, Fut>(name: String, test: F) -> Case
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = TestResult> + Send + 'static,
    {
        Case {
            name,
            needs: None,
            test: Box::new(move |_| Box::pin(test())),
        }
    }
}

/// Runs the cases as libtest does; a case whose service's variable is unset shows as ignored,
/// or fails naming the variable with `SYNC_REQUIRE_LIVE=1`.
pub fn run(cases: Vec<Case>) -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(DEFAULT_THREADS);
    let require = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
    let trials = cases.into_iter().map(|c| trial(c, require)).collect();
    libtest_mimic::run(&args, trials).exit_code()
}

fn trial(case: Case, require: bool) -> Trial {
    let Case { name, needs, test } = case;
    let url = match needs {
        None => String::new(),
        Some(live) => match live.url() {
            Some(url) => url,
            None => {
                let why = format!(
                    "{} is not set: this test needs a live {}",
                    live.var(),
                    live.name()
                );
                return Trial::test(name, move || Err(why.into())).with_ignored_flag(!require);
            }
        },
    };
    Trial::test(name, move || block_on(test(url)).map_err(Into::into))
}

/// Runs `test` to its end or [`TEST_LIMIT`]; dropping it kills what it started.
fn block_on(test: BoxedTest) -> TestResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    let out = rt.block_on(async move {
        tokio::time::timeout(TEST_LIMIT, test)
            .await
            .map_err(|_| format!("the test took over {TEST_LIMIT:?}"))?
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    out
}
