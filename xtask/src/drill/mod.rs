//! `cargo xtask drill [etcd] [cluster] [task] [--seconds N]`: multi-process lock, leader and task
//! drills on a live etcd, then the drills on a three-node cluster of their own ([`cluster`]).
//! `cargo xtask drill redis [cluster|task|restart]`: the same drills on Redis and a Redis
//! Cluster, and the lock drill across Redis restarts without persistence ([`redis`]).
//! `cargo xtask drill consul [task|restart]`: the drills on a Consul agent, and the lock drill
//! across restarts of a Consul server that keeps its raft log ([`consul`]).
//!
//! Several worker processes (sync-any's `drill_worker` example) take one lock over and over
//! and, holding it, write their fencing token to a shared resource; meanwhile the drill kills
//! workers with SIGKILL (and starts new ones) and stops others with SIGSTOP for longer than
//! the lease TTL. At the end it orders every worker's lines by their timestamps and replays the
//! writes against a fenced resource (it refuses a token below the highest written):
//!
//! - a write by a worker that was never stopped during its hold, made after another worker was
//!   granted the lock, means two live holders overlapped: a violation (whether or not the other
//!   had written yet);
//! - a stale write by a worker stopped during its hold is what fencing is for: counted;
//! - a worker's own tokens must strictly increase, and no two grants may share a token.
//!
//! It prints a summary table and fails on any violation. The leader drill does the same with
//! an election, the term as the token. Then the task drill ([`task`]) runs a shared job queue
//! under the same chaos, submitting keyed jobs at a steady pace, and judges what became of
//! every job: none lost, duplicated or stuck, every re-run after a lost claim with a higher
//! token.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead, BufReader},
    process::{Child, Command, ExitCode, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::{sys::signal, unistd::Pid};

mod cluster;
mod consul;
mod redis;
mod task;

use crate::{Result, fmt_duration, project_root, services::Service};

/// Worker processes running at once.
const WORKERS: usize = 4;
/// Scheduling slack on a loaded machine for a write's deadline after a restart, in µs.
const RESTART_SLACK_US: u128 = 250_000;

/// The lease the workers use and how long a stop lasts, by backend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Lease {
    /// The TTL the workers use.
    pub(crate) ttl: Duration,
    /// How long a stopped worker stays stopped: past its TTL, so its lease expires meanwhile.
    pub(crate) stop_for: Duration,
    /// More query keys of the workers' URL.
    query: &'static str,
}

impl Lease {
    /// etcd's shortest lease (Redis takes it too).
    const SHORT: Lease = Lease {
        ttl: Duration::from_secs(2),
        stop_for: Duration::from_millis(3000),
        query: "",
    };

    /// Consul's shortest session TTL. No lock-delay: a holder must see its loss on its own
    /// deadline (0.8 TTL after its last renewal was sent), before Consul can invalidate its
    /// session (a TTL after that renewal arrived, or later); the judge counts on nothing more.
    const CONSUL: Lease = Lease {
        ttl: Duration::from_secs(10),
        stop_for: Duration::from_secs(12),
        query: "lock_delay=0s",
    };

    /// The lease for the backend `url` names.
    pub(crate) fn of(url: &str) -> Lease {
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        match scheme {
            "consul" | "consuls" => Lease::CONSUL,
            _ => Lease::SHORT,
        }
    }

    /// The workers' URL: `url` in `namespace`, with this lease's TTL and keys, and the query
    /// `url` had.
    pub(crate) fn url(&self, url: &str, namespace: &str) -> String {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut url = format!(
            "{}/{namespace}?ttl={}s",
            base.trim_end_matches('/'),
            self.ttl.as_secs()
        );
        for more in [self.query, query] {
            if !more.is_empty() {
                url = format!("{url}&{more}");
            }
        }
        url
    }
}

/// Which drills of a backend to run.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Scope {
    All,
    Cluster,
    Task,
    Restart,
}

/// `cargo xtask drill` with its arguments.
pub(crate) fn run(args: &[String]) -> Result<ExitCode> {
    let mut seconds = 60u64;
    let mut only_cluster = false;
    let mut only_task = false;
    let mut on_redis = false;
    let mut on_consul = false;
    let mut only_restart = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "etcd" => {}
            "redis" => on_redis = true,
            "consul" => on_consul = true,
            "cluster" => only_cluster = true,
            "task" => only_task = true,
            "restart" => only_restart = true,
            "--seconds" => {
                seconds = rest
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--seconds takes a whole number")?;
            }
            "--minutes" => {
                let minutes: u64 = rest
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--minutes takes a whole number")?;
                seconds = minutes * 60;
            }
            other => {
                bail!(
                    "drill: unknown argument `{other}` (etcd, redis, consul, cluster, task, restart, --seconds N, --minutes N)"
                )
            }
        }
    }
    let length = Duration::from_secs(seconds);
    let scope = match (only_cluster, only_task, only_restart) {
        (true, _, _) => Scope::Cluster,
        (_, true, _) => Scope::Task,
        (_, _, true) => Scope::Restart,
        _ => Scope::All,
    };
    if on_redis && on_consul {
        bail!("drill: one backend at a time (redis or consul)");
    }
    if on_redis {
        return redis::drill(length, scope);
    }
    if on_consul {
        if scope == Scope::Cluster {
            bail!("drill: `cluster` is an etcd or Redis drill; Consul's are task and restart");
        }
        return consul::drill(length, scope);
    }
    if only_restart {
        bail!(
            "drill: `restart` is a Redis or Consul drill: `cargo xtask drill redis restart`, `cargo xtask drill consul restart`"
        );
    }
    if only_cluster {
        return drill_cluster(length);
    }
    let single = drill_single(length, only_task)?;
    if only_task {
        return Ok(single);
    }
    let cluster = drill_cluster(length)?;
    Ok(if single == ExitCode::SUCCESS {
        cluster
    } else {
        single
    })
}

/// The drills on one etcd: the user's own when SYNC_TEST_ETCD names one; otherwise ours,
/// started and stopped here like `cargo xtask test` does.
fn drill_single(length: Duration, only_task: bool) -> Result<ExitCode> {
    on_service(Service::Etcd, |url| match only_task {
        true => task::drill(&build_worker()?, url, length),
        false => drill(url, length),
    })
}

/// Runs `run` on `service`: the user's own when its SYNC_TEST_* variable names one; otherwise
/// ours, started and stopped here like `cargo xtask test` does.
fn on_service(service: Service, run: impl Fn(&str) -> Result<ExitCode>) -> Result<ExitCode> {
    if let Some(url) = std::env::var(service.env_var())
        .ok()
        .filter(|v| !v.is_empty())
    {
        return run(&url);
    }
    let started = crate::services::up(&[service], &[])?;
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&service.endpoint())))
            .unwrap_or_else(|_| Err("xtask panicked while drilling".into()));
    if let Err(e) = crate::services::down(&started) {
        say!("warning: teardown: {e}");
    }
    outcome
}

/// Runs the lock drill, the leader drill and the task drill against `url`, `length` each (the
/// task drill then drains its queue for up to 20–60 s more).
pub(crate) fn drill(url: &str, length: Duration) -> Result<ExitCode> {
    let worker = build_worker()?;
    let mut code = ExitCode::SUCCESS;
    for what in ["lock", "leader"] {
        if drill_one(&worker, what, url, length)? != ExitCode::SUCCESS {
            code = ExitCode::FAILURE;
        }
    }
    if task::drill(&worker, url, length)? != ExitCode::SUCCESS {
        code = ExitCode::FAILURE;
    }
    Ok(code)
}

/// The lock drill, then the leader and task drills where `url`'s backend has them (a backend
/// gains them over time: until then each is skipped, and says so), `length` each; only the
/// task drill with `only_task`.
pub(crate) fn drills_where_capable(
    worker: &std::path::Path,
    url: &str,
    length: Duration,
    only_task: bool,
) -> Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    let primitives: &[&'static str] = match only_task {
        true => &["task"],
        false => &["lock", "leader", "task"],
    };
    for &what in primitives {
        if crate::interrupted() {
            break;
        }
        if what != "lock" && !capable(worker, url, what)? {
            say!(
                "drill {what} on {url}: SKIPPED (untested), the backend does not report the {what} capability"
            );
            continue;
        }
        let outcome = match what {
            "task" => task::drill(worker, url, length)?,
            _ => drill_one(worker, what, url, length)?,
        };
        if outcome != ExitCode::SUCCESS {
            code = ExitCode::FAILURE;
        }
    }
    Ok(code)
}

/// Whether the backend at `url` reports `capability`, as the worker sees it.
fn capable(worker: &std::path::Path, url: &str, capability: &str) -> Result<bool> {
    let out = Command::new(worker)
        .args([url, "capable", capability, "0"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!(
            "drill: asking {url} for its capabilities failed ({})",
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "CAPABLE yes")
}

/// The lock drill alone on `url`, `length` long: the short Redis and Consul drills of
/// `cargo xtask test`.
pub(crate) fn drill_lock(url: &str, length: Duration) -> Result<ExitCode> {
    drill_one(&build_worker()?, "lock", url, length)
}

/// Runs the drills on a three-node cluster of their own (see [`cluster`]), `length` each.
pub(crate) fn drill_cluster(length: Duration) -> Result<ExitCode> {
    let worker = build_worker()?;
    let examples = worker
        .parent()
        .ok_or("drill: the worker has no directory")?;
    cluster::drill(examples, length)
}

/// One drill: `what` (lock or leader) under worker chaos for `length`, judged.
fn drill_one(
    worker: &std::path::Path,
    what: &'static str,
    url: &str,
    length: Duration,
) -> Result<ExitCode> {
    let mut run = Run::start(worker, what, url, length)?;
    let until = Instant::now() + length;
    while Instant::now() < until && !crate::interrupted() {
        thread::sleep(Duration::from_millis(700 + run.dice.below(1300)));
        run.strike_a_worker()?;
    }
    Ok(run.finish(what, &[]))
}

/// A drill in progress: the worker processes, what they printed so far, and the chaos done.
pub(crate) struct Run {
    bin: std::path::PathBuf,
    what: &'static str,
    url: String,
    length: Duration,
    lease: Lease,
    /// When the chaos must be over: a stop that would last past it is a kill instead.
    ends: Instant,
    lines: mpsc::Sender<(usize, String)>,
    events: mpsc::Receiver<(usize, String)>,
    workers: Vec<Child>,
    /// The worker id (the order it was started in) running in each slot.
    ids: Vec<usize>,
    next: usize,
    stops: HashMap<usize, Vec<(u128, u128)>>,
    kills: usize,
    pauses: usize,
    restarts: Restarts,
    /// Workers that exited on their own before the end (an error), by worker id.
    exited: Vec<usize>,
    seen: Vec<(usize, String)>,
    pub(crate) dice: Dice,
}

impl Run {
    /// Starts [`WORKERS`] workers doing `what` on `url` (given a fresh namespace and the
    /// backend's drill [`Lease`]) for `length`.
    pub(crate) fn start(
        bin: &std::path::Path,
        what: &'static str,
        url: &str,
        length: Duration,
    ) -> Result<Run> {
        let lease = Lease::of(url);
        let url = lease.url(url, &format!("drill-{}", now_us()));
        say!(
            "drill {what}: {WORKERS} workers on {url} for {}",
            fmt_duration(length)
        );
        let (lines, events) = mpsc::channel::<(usize, String)>();
        let mut run = Run {
            bin: bin.to_path_buf(),
            what,
            url,
            length,
            lease,
            ends: Instant::now() + length,
            lines,
            events,
            workers: Vec::new(),
            ids: (0..WORKERS).collect(),
            next: WORKERS,
            stops: HashMap::new(),
            kills: 0,
            pauses: 0,
            restarts: Restarts::default(),
            exited: Vec::new(),
            seen: Vec::new(),
            dice: Dice::seeded(),
        };
        for n in 0..WORKERS {
            let child = run.spawn(n)?;
            run.workers.push(child);
        }
        Ok(run)
    }

    /// Notes the workers that exited by themselves so far (they should run to the end: a
    /// backend restart is to be ridden out) and starts others in their slots.
    pub(crate) fn reap_exited(&mut self) {
        for slot in 0..self.workers.len() {
            let Ok(Some(status)) = self.workers[slot].try_wait() else {
                continue;
            };
            // A worker runs a little past the drill's length: one that ended cleanly was done.
            let id = self.ids[slot];
            if !status.success() && !self.exited.contains(&id) {
                self.exited.push(id);
            }
            if Instant::now() < self.ends
                && let Ok(child) = self.spawn(self.next)
            {
                self.workers[slot] = child;
                self.ids[slot] = self.next;
                self.next += 1;
            }
        }
    }

    fn spawn(&self, id: usize) -> Result<Child> {
        spawn_worker(
            &self.bin,
            self.what,
            &self.url,
            self.length,
            id,
            self.lines.clone(),
        )
    }

    /// Takes in what the workers printed since the last call.
    pub(crate) fn collect(&mut self) {
        self.seen.extend(self.events.try_iter());
    }

    /// Whether a worker holds the lock now, as far as its lines tell.
    pub(crate) fn held(&mut self) -> bool {
        self.collect();
        holding(&self.seen).is_some()
    }

    /// Records a backend restart that lost every lock: killed at `killed`, answering at `up`.
    pub(crate) fn restarted(&mut self, killed: u128, up: u128) {
        self.restarts.lost_data.push((killed, up));
    }

    /// Records a backend restart that kept its data (every lock and session): no hold may be
    /// excused by it.
    pub(crate) fn restarted_keeping_data(&mut self) {
        self.restarts.kept_data += 1;
    }

    /// Stops the holder of the moment past the TTL, or kills (-9) a worker and starts another.
    /// The first strike is a stop, so that even a short drill pauses a holder; a stop that
    /// would outlast the drill is a kill.
    fn strike_a_worker(&mut self) -> Result<()> {
        self.reap_exited();
        let fits = Instant::now() + self.lease.stop_for <= self.ends;
        let stop = fits && (self.pauses == 0 || self.dice.below(2) == 0);
        // A stop is aimed at a holder; holds are short, so wait a moment for one.
        if stop {
            cluster::wait_until(Duration::from_secs(1), || self.held());
        }
        self.collect();
        let holder = holding(&self.seen).and_then(|w| self.ids.iter().position(|id| *id == w));
        let slot = match (stop, holder) {
            (true, Some(slot)) => slot,
            _ => self.dice.below(WORKERS as u64) as usize,
        };
        let pid = Pid::from_raw(self.workers[slot].id() as i32);
        if stop {
            let from = now_us();
            let _ = signal::kill(pid, signal::Signal::SIGSTOP);
            thread::sleep(self.lease.stop_for);
            let _ = signal::kill(pid, signal::Signal::SIGCONT);
            self.stops
                .entry(self.ids[slot])
                .or_default()
                .push((from, now_us()));
            self.pauses += 1;
        } else {
            let _ = signal::kill(pid, signal::Signal::SIGKILL);
            let _ = self.workers[slot].wait();
            self.workers[slot] = self.spawn(self.next)?;
            self.ids[slot] = self.next;
            self.next += 1;
            self.kills += 1;
        }
        Ok(())
    }

    /// Stops the workers, judges everything they printed and prints the summary, with `extra`
    /// rows (the chaos done to the backend). SUCCESS when there was no violation.
    pub(crate) fn finish(mut self, label: &str, extra: &[(&str, String)]) -> ExitCode {
        self.reap_exited();
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        drop(self.lines);
        self.seen.extend(self.events);
        let lines = std::mem::take(&mut self.seen);
        let verdict = judge(lines.clone(), &self.stops, &self.restarts, self.lease.ttl);
        if !verdict.violations.is_empty() {
            keep_lines(&self.url, &lines);
        }
        let mut extra = extra.to_vec();
        if self.exited.is_empty() {
            let _ = std::fs::remove_file(worker_log(&self.url));
        } else {
            extra.push((
                "workers that exited on an error (log below)",
                self.exited.len().to_string(),
            ));
            say!(
                "drill {label}: workers {:?} exited on their own; their errors are in {}",
                self.exited,
                worker_log(&self.url).display()
            );
        }
        verdict.print(label, self.kills, self.pauses, self.lease.ttl, &extra);
        if verdict.violations.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// Writes every worker's lines next to the workers' log, for a drill with violations.
fn keep_lines(url: &str, lines: &[(usize, String)]) {
    let path = worker_log(url).with_extension("lines");
    let text: String = lines.iter().map(|(w, l)| format!("{w} {l}\n")).collect();
    match std::fs::write(&path, text) {
        Ok(()) => say!(
            "drill: every worker's lines (worker, line) are in {}",
            path.display()
        ),
        Err(e) => say!("drill: could not keep the lines in {}: {e}", path.display()),
    }
}

/// Where the workers of the drill on `url` write their errors: one file per drill namespace,
/// under the target directory.
fn worker_log(url: &str) -> std::path::PathBuf {
    let namespace = url
        .split_once('?')
        .map_or(url, |(base, _)| base)
        .rsplit('/')
        .next()
        .unwrap_or("drill");
    crate::target_dir()
        .join("drill")
        .join(format!("{namespace}.log"))
}

fn build_worker() -> Result<std::path::PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or("cargo".into());
    let status = Command::new(cargo)
        .current_dir(project_root())
        .args([
            "build",
            "-q",
            "-p",
            "sync-any",
            "--features",
            "etcd,redis,consul",
            "--example",
            "drill_worker",
            "--example",
            "drill_calls",
        ])
        .status()?;
    if !status.success() {
        bail!("drill: building the drill workers failed ({status})");
    }
    Ok(crate::target_dir().join("debug/examples/drill_worker"))
}

fn spawn_worker(
    bin: &std::path::Path,
    what: &str,
    url: &str,
    length: Duration,
    id: usize,
    lines: mpsc::Sender<(usize, String)>,
) -> Result<Child> {
    let log = worker_log(url);
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // The chaos makes workers complain; what they say is kept for a worker that gives up.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = Command::new(bin)
        .args([url, what, "drill", &(length.as_secs() + 5).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let out = child.stdout.take().ok_or("drill: no worker stdout")?;
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if lines.send((id, line)).is_err() {
                return;
            }
        }
    });
    Ok(child)
}

/// The worker whose latest GRANT (by arrival) has no WRITE or LOST yet: the holder now.
fn holding(lines: &[(usize, String)]) -> Option<usize> {
    let (worker, line) = lines.iter().rev().find(|(_, l)| !l.is_empty())?;
    line.starts_with("GRANT").then_some(*worker)
}

/// The backend restarts of a drill.
#[derive(Default)]
pub(crate) struct Restarts {
    /// Restarts that lost every hold (Redis without persistence): (killed, answering again),
    /// µs since the epoch. A holder may write once more before it learns so.
    lost_data: Vec<(u128, u128)>,
    /// Restarts that kept every hold (a Consul server with its raft log): they excuse nothing.
    kept_data: usize,
}

impl Restarts {
    fn any(&self) -> bool {
        self.kept_data > 0 || !self.lost_data.is_empty()
    }
}

/// What the lines say.
#[derive(Default)]
struct Verdict {
    grants: usize,
    writes: usize,
    lost_seen: usize,
    /// Holds during which their worker was stopped past the TTL, and of those, how many the
    /// worker then reported lost instead of writing.
    paused_holds: usize,
    paused_saw_loss: usize,
    /// The longest time between two grants (µs): how long the lock or leadership stood
    /// vacant at worst (a killed holder's lease running out, a failover).
    longest_vacancy_us: u128,
    /// Backend restarts judged, and what they did: writes by holders whose hold the restart
    /// erased, made after another grant (overlaps), and of those, the ones after a higher
    /// token's write (stale: a fenced resource rejects them).
    restarts: usize,
    kept_restarts: usize,
    erased_writes: usize,
    overlaps: usize,
    stale_rejected: usize,
    violations: Vec<String>,
}

impl Verdict {
    fn print(
        &self,
        what: &str,
        kills: usize,
        pauses: usize,
        ttl: Duration,
        extra: &[(&str, String)],
    ) {
        let vacancy = format!("longest time between two grants (TTL {} s)", ttl.as_secs());
        let rows = [
            ("grants", self.grants.to_string()),
            ("writes", self.writes.to_string()),
            (
                "holders that saw their loss before writing",
                self.lost_seen.to_string(),
            ),
            (
                "holders stopped past the TTL / saw their loss",
                format!("{} / {}", self.paused_holds, self.paused_saw_loss),
            ),
            ("workers killed (-9)", kills.to_string()),
            ("workers stopped past the TTL", pauses.to_string()),
            (
                vacancy.as_str(),
                format!("{:.2} s", self.longest_vacancy_us as f64 / 1e6),
            ),
        ];
        say!("drill {what} summary:");
        let violations = ("violations", self.violations.len().to_string());
        let rows = rows
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .chain(self.restart_rows())
            .chain(extra.iter().cloned())
            .chain([violations]);
        for (what, n) in rows {
            eprintln!("  {what:<48} {n:>8}");
        }
        for v in &self.violations {
            say!("VIOLATION: {v}");
        }
    }

    /// A write `after` µs past the restart that erased its hold: an overlap when a later grant
    /// came first, stale (rejected by fencing) when a higher token was written first, and a
    /// violation when the holder should have learned of its loss by then (one TTL).
    fn judge_erased(&mut self, write: Erased) {
        let Erased {
            worker,
            token,
            after,
            overlap,
            stale,
            ttl,
        } = write;
        self.erased_writes += 1;
        self.overlaps += usize::from(overlap);
        self.stale_rejected += usize::from(stale);
        if after > ttl.as_micros() + RESTART_SLACK_US {
            self.violations.push(format!(
                "worker {worker} wrote token {token} {:.2} s after a restart erased its hold",
                after as f64 / 1e6
            ));
        }
    }

    /// The rows of a drill that restarted the backend; none for the others.
    fn restart_rows(&self) -> Vec<(&'static str, String)> {
        if self.kept_restarts > 0 {
            return vec![(
                "backend restarts (-9, data kept)",
                self.kept_restarts.to_string(),
            )];
        }
        if self.restarts == 0 {
            return Vec::new();
        }
        vec![
            (
                "backend restarts (-9, data lost)",
                self.restarts.to_string(),
            ),
            (
                "writes by holders a restart had erased",
                self.erased_writes.to_string(),
            ),
            ("  overlaps: after a later grant", self.overlaps.to_string()),
            (
                "  stale: after a higher write, fencing rejects",
                self.stale_rejected.to_string(),
            ),
        ]
    }
}

/// A write by a holder whose hold a restart erased, for [`Verdict::judge_erased`]: `after` µs
/// past the restart; an overlap when a later grant came first, stale when a higher token was
/// written first.
struct Erased {
    worker: usize,
    token: u64,
    after: u128,
    overlap: bool,
    stale: bool,
    ttl: Duration,
}

/// The restart (killed, up) that erased a hold granted at `since` and still held at `at`.
fn restart_within(restarts: &[(u128, u128)], since: u128, at: u128) -> Option<(u128, u128)> {
    restarts
        .iter()
        .copied()
        .find(|(killed, up)| since < *up && at > *killed)
}

/// Whether `worker` was stopped past the TTL between its latest grant and `at`.
fn was_paused(
    stops: &HashMap<usize, Vec<(u128, u128)>>,
    worker: usize,
    granted_at: &HashMap<usize, u128>,
    at: u128,
) -> bool {
    let since = granted_at.get(&worker).copied().unwrap_or(0);
    stops
        .get(&worker)
        .is_some_and(|s| s.iter().any(|(from, to)| *from < at && *to > since))
}

/// Replays every worker's lines in timestamp order against a fenced resource. Restarts that
/// lost every hold let a holder write once more before it learns so, after the next grant (an
/// overlap), within `ttl`; fencing must reject it if a higher token was written. Across any
/// restart, tokens must keep rising.
fn judge(
    lines: Vec<(usize, String)>,
    stops: &HashMap<usize, Vec<(u128, u128)>>,
    restarts: &Restarts,
    ttl: Duration,
) -> Verdict {
    let mut verdict = Verdict {
        restarts: restarts.lost_data.len(),
        kept_restarts: restarts.kept_data,
        ..Verdict::default()
    };
    // (timestamp, worker, kind, token), in time order.
    let mut events: BTreeMap<(u128, usize, u64), (String, u64)> = BTreeMap::new();
    for (seq, (worker, line)) in lines.into_iter().enumerate() {
        let mut parts = line.split_whitespace();
        let (Some(kind), Some(token), Some(at)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(token), Ok(at)) = (token.parse::<u64>(), at.parse::<u128>()) else {
            continue;
        };
        events.insert((at, worker, seq as u64), (kind.to_string(), token));
    }
    let mut granted_at: HashMap<usize, u128> = HashMap::new();
    let mut last_token: HashMap<usize, u64> = HashMap::new();
    let mut tokens_granted: HashSet<u64> = HashSet::new();
    let mut highest_write = 0u64;
    let mut highest_grant = 0u64;
    // The latest grant: when, and its token.
    let mut last_grant: Option<(u128, u64)> = None;
    for ((at, worker, _), (kind, token)) in events {
        match kind.as_str() {
            "GRANT" => {
                verdict.grants += 1;
                if let Some((last, _)) = last_grant {
                    verdict.longest_vacancy_us = verdict.longest_vacancy_us.max(at - last);
                }
                last_grant = Some((at, token));
                if !tokens_granted.insert(token) {
                    verdict
                        .violations
                        .push(format!("token {token} was granted twice"));
                }
                if last_token.get(&worker).is_some_and(|t| *t >= token) {
                    verdict
                        .violations
                        .push(format!("worker {worker}'s tokens went back to {token}"));
                }
                // Across a restart (on Redis the fence key dies with the data) the next token
                // must still be higher. Without one, a grant printed late (its worker stopped
                // first) may show a lower token later: that worker then reports its loss.
                if restarts.any() && token < highest_grant {
                    verdict.violations.push(format!(
                        "token {token} was granted after token {highest_grant}: fencing went backwards"
                    ));
                }
                highest_grant = highest_grant.max(token);
                last_token.insert(worker, token);
                granted_at.insert(worker, at);
            }
            "LOST" | "WRITE" if was_paused(stops, worker, &granted_at, at) => {
                verdict.paused_holds += 1;
                if kind == "LOST" {
                    verdict.paused_saw_loss += 1;
                    verdict.lost_seen += 1;
                    continue;
                }
                verdict.writes += 1;
                verdict.violations.push(format!(
                    "worker {worker} was stopped past the TTL holding token {token} and wrote without seeing its loss"
                ));
            }
            "LOST" => verdict.lost_seen += 1,
            "WRITE" => {
                verdict.writes += 1;
                let since = granted_at.get(&worker).copied().unwrap_or(0);
                if let Some((killed, _)) = restart_within(&restarts.lost_data, since, at) {
                    verdict.judge_erased(Erased {
                        worker,
                        token,
                        after: at - killed,
                        overlap: token < highest_grant,
                        stale: token < highest_write,
                        ttl,
                    });
                    highest_write = highest_write.max(token);
                    continue;
                }
                // A live holder writes before it releases, so before any later grant: a write
                // after another's grant is an overlap, even if the other has not written yet.
                let granted_since = last_grant.filter(|(at, _)| *at > since);
                if token < highest_write {
                    verdict.violations.push(format!(
                        "worker {worker} wrote token {token} after token {highest_write} was written, without having been stopped: two live holders"
                    ));
                } else if let Some((_, other)) = granted_since {
                    verdict.violations.push(format!(
                        "worker {worker} wrote token {token} after token {other} was granted, without having been stopped: two live holders"
                    ));
                }
                highest_write = highest_write.max(token);
            }
            _ => {}
        }
    }
    verdict
}

pub(crate) fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}

/// A small xorshift generator: the drill's chaos needs no cryptographic randomness, and xtask
/// keeps its dependencies few.
pub(crate) struct Dice(u64);

impl Dice {
    fn seeded() -> Dice {
        Dice(now_us() as u64 | 1)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(worker: usize, text: &str) -> (usize, String) {
        (worker, text.to_string())
    }

    const TTL: Duration = Duration::from_secs(2);

    fn none() -> Restarts {
        Restarts::default()
    }

    #[test]
    fn overlapping_live_holders_and_unnoticed_pauses_are_violations() {
        let lines = vec![
            line(0, "GRANT 10 100"),
            line(1, "GRANT 20 300"),
            line(1, "WRITE 20 310"),
            line(0, "WRITE 10 400"),
        ];
        let live = judge(lines.clone(), &HashMap::new(), &none(), TTL);
        assert_eq!(live.violations.len(), 1, "{:?}", live.violations);
        // Stopped past the TTL while holding, and then writing: the pause went unnoticed.
        let stopped = HashMap::from([(0, vec![(150, 350)])]);
        let unnoticed = judge(lines.clone(), &stopped, &none(), TTL);
        assert_eq!(unnoticed.violations.len(), 1, "{:?}", unnoticed.violations);
        assert_eq!((unnoticed.paused_holds, unnoticed.paused_saw_loss), (1, 0));
        // The same pause, noticed: the worker reports LOST instead of writing.
        let mut noticed = lines;
        noticed[3] = line(0, "LOST 10 400");
        let fine = judge(noticed, &stopped, &none(), TTL);
        assert!(fine.violations.is_empty(), "{:?}", fine.violations);
        assert_eq!((fine.paused_holds, fine.paused_saw_loss), (1, 1));
    }

    #[test]
    fn overlaps_after_a_restart_are_counted_and_backward_tokens_are_violations() {
        // Worker 0 holds 10 when the server restarts at 200 (up at 250); worker 1 is granted
        // 20 at 300 and writes; worker 0 writes 10 at 400, before its renewal told it.
        let lines = vec![
            line(0, "GRANT 10 100"),
            line(1, "GRANT 20 300"),
            line(1, "WRITE 20 310"),
            line(0, "WRITE 10 400"),
        ];
        let restarts = Restarts {
            lost_data: vec![(200, 250)],
            kept_data: 0,
        };
        let fine = judge(lines.clone(), &HashMap::new(), &restarts, TTL);
        assert!(fine.violations.is_empty(), "{:?}", fine.violations);
        assert_eq!(
            (fine.erased_writes, fine.overlaps, fine.stale_rejected),
            (1, 1, 1)
        );
        // A token below one granted before: the fence went back with the data.
        let mut back = lines.clone();
        back[1] = line(1, "GRANT 5 300");
        back[2] = line(1, "WRITE 5 310");
        let backwards = judge(back, &HashMap::new(), &restarts, TTL);
        assert_eq!(backwards.violations.len(), 1, "{:?}", backwards.violations);
        // Still writing long after the restart: the loss went unnoticed.
        let mut late = lines;
        late[3] = line(0, "WRITE 10 5000000");
        let unnoticed = judge(late, &HashMap::new(), &restarts, TTL);
        assert_eq!(unnoticed.violations.len(), 1, "{:?}", unnoticed.violations);
    }

    #[test]
    fn a_write_after_a_higher_grant_is_an_overlap_even_before_its_write() {
        let lines = vec![
            line(0, "GRANT 10 100"),
            line(1, "GRANT 20 300"),
            line(0, "WRITE 10 400"),
            line(1, "WRITE 20 410"),
        ];
        let v = judge(lines, &HashMap::new(), &none(), TTL);
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        assert!(v.violations[0].contains("granted"), "{:?}", v.violations);
        // Taking turns is fine.
        let turns = vec![
            line(0, "GRANT 10 100"),
            line(0, "WRITE 10 200"),
            line(1, "GRANT 20 300"),
            line(1, "WRITE 20 400"),
        ];
        assert!(
            judge(turns, &HashMap::new(), &none(), TTL)
                .violations
                .is_empty()
        );
    }

    #[test]
    fn a_restart_that_kept_its_data_excuses_nothing() {
        let kept = Restarts {
            lost_data: Vec::new(),
            kept_data: 1,
        };
        let overlap = vec![
            line(0, "GRANT 10 100"),
            line(1, "GRANT 20 300"),
            line(1, "WRITE 20 310"),
            line(0, "WRITE 10 400"),
        ];
        let v = judge(overlap, &HashMap::new(), &kept, TTL);
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        assert_eq!((v.kept_restarts, v.erased_writes), (1, 0));
        let backwards = vec![
            line(0, "GRANT 10 100"),
            line(0, "WRITE 10 110"),
            line(1, "GRANT 5 300"),
            line(1, "WRITE 5 310"),
        ];
        let v = judge(backwards, &HashMap::new(), &kept, TTL);
        assert!(
            v.violations.iter().any(|e| e.contains("backwards")),
            "{:?}",
            v.violations
        );
    }

    #[test]
    fn consul_workers_get_its_lease() {
        let consul = Lease::of("consul://127.0.0.1:18500/?token=t");
        assert_eq!(consul.ttl, Duration::from_secs(10));
        assert!(consul.stop_for > consul.ttl);
        assert_eq!(
            consul.url("consul://127.0.0.1:18500/?token=t", "drill-1"),
            "consul://127.0.0.1:18500/drill-1?ttl=10s&lock_delay=0s&token=t"
        );
        let etcd = Lease::of("etcd://127.0.0.1:12379");
        assert!(etcd.stop_for > etcd.ttl);
        assert_eq!(
            etcd.url("etcd://127.0.0.1:12379", "drill-1"),
            "etcd://127.0.0.1:12379/drill-1?ttl=2s"
        );
        assert_eq!(Lease::of("redis://h:1"), Lease::SHORT);
        assert_eq!(
            worker_log("consul://h:1/drill-7?ttl=10s&lock_delay=0s")
                .file_name()
                .and_then(|n| n.to_str()),
            Some("drill-7.log")
        );
    }

    #[test]
    fn a_token_granted_twice_is_a_violation() {
        let lines = vec![line(0, "GRANT 10 100"), line(1, "GRANT 10 200")];
        assert_eq!(
            judge(lines, &HashMap::new(), &none(), TTL).violations.len(),
            1
        );
    }
}
