//! The task drill: a shared job queue on etcd under kill -9 and SIGSTOP chaos.
//!
//! Several worker processes (`drill_worker … task`) run the handler of one job name with a pool
//! of two; a submitter process (`drill_worker … task-submit`) submits a known set of jobs with
//! idempotency keys at a steady pace over the first three quarters of the drill, and submits
//! each one a second time a little later. Meanwhile the drill kills workers with SIGKILL (and
//! starts new ones), stops busy ones with SIGSTOP for longer than the lease TTL, and now and
//! then kills the submitter too: its replacement resumes from the first job whose submit was
//! not confirmed, submitting every job from there that is already due again, with the same
//! keys. When the chaos ends, the workers left drain the queue while a fresh client
//! (`drill_worker … task-check`) waits for every submitted job, within a bounded time, and
//! prints its status.
//!
//! Each attempt prints `START`, then `DONE` or — when the claim's loss signal fired first —
//! `LOST`, with the job, the claim's fencing token and the time; a job's output is the token
//! of the attempt that finished it. The judge orders each job's attempts by token (the order
//! of the claims) and counts:
//!
//! - duplicated: a key that yielded two job ids; or an attempt superseded by a later claim
//!   although its worker was neither killed nor stopped between the two starts and it did not
//!   report its loss (a second run beside, or after, a live worker's: at-least-once is only
//!   for workers that died or stalled); or a job whose recorded outcome is not its last claim's
//!   (it ran again after it had succeeded, or a stale attempt's outcome won);
//! - re-run after a lost claim: an attempt superseded whose worker was killed or stopped past
//!   the TTL in that window, or that reported `LOST` — what at-least-once delivery is for;
//! - lost: a submitted job that is Failed (its handler never fails but on a loss, and it has
//!   100 attempts), unknown to the backend, or whose status could not be read;
//! - stuck: a job still Queued or Running once the drain time is up;
//! - fencing: a claim whose token is not above the previous claim's (tokens that go back in
//!   time, unless the later-started attempt's start was delayed by a stop of its worker), one
//!   token claimed twice, or a handler that printed DONE although its worker was stopped past
//!   the TTL during the attempt (the loss signal missed the pause).
//!
//! It prints a summary table and fails on any violation.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, ExitCode, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};

use super::{Dice, Lease, now_us};
use crate::{Result, fmt_duration};

/// Worker processes running at once (each runs two jobs at a time).
const WORKERS: usize = 4;
/// The job name, which is the queue.
const QUEUE: &str = "drill";
/// One job submitted this often while the submitter runs.
const PACE: Duration = Duration::from_millis(150);
/// How far the drill's record of a stop may be off the process's actual stop, in µs: the
/// stop's start is read before SIGSTOP is sent and its end after SIGCONT.
const SLACK_US: u128 = 100_000;

/// What the drill did to which process: worker id → when it was killed, and when it was
/// stopped (from, to), in microseconds since the epoch.
#[derive(Default)]
struct Chaos {
    kills: HashMap<usize, u128>,
    stops: HashMap<usize, Vec<(u128, u128)>>,
    submitter_kills: usize,
}

/// The task drill against `url` (a backend URL without namespace): chaos for `length`, then a
/// drain of at most 20–60 s (longer on a backend whose lease is longer), judged.
pub(super) fn drill(worker: &Path, url: &str, length: Duration) -> Result<ExitCode> {
    let lease = Lease::of(url);
    let url = lease.url(url, &format!("drill-{}", now_us()));
    let span = (length * 3 / 4).max(Duration::from_secs(1));
    let count = (span.as_millis() / PACE.as_millis()).max(10) as u64;
    let drain = drain_time(length, lease);
    say!(
        "drill task: {WORKERS} workers and a submitter ({count} jobs) on {url} for {}, then a drain of at most {}",
        fmt_duration(length),
        fmt_duration(drain)
    );
    let (lines, events) = mpsc::channel::<(usize, String)>();
    // Workers outlive the chaos and the drain; they are killed once the check is over.
    let live_for = (length + drain + Duration::from_secs(60))
        .as_secs()
        .to_string();
    let spawn_worker = |n: usize| {
        spawn(
            worker,
            &[&url, "task", QUEUE, &live_for],
            None,
            n,
            lines.clone(),
        )
    };
    let start_us = (now_us() + 500_000).to_string();
    let (span_s, count_s) = (span.as_secs().to_string(), count.to_string());
    // A submitter resumes from the first job whose submit it has not confirmed (printed).
    let spawn_submitter = |n: usize, from: u64| {
        let from = from.to_string();
        spawn(
            worker,
            &[
                &url,
                "task-submit",
                QUEUE,
                &span_s,
                &start_us,
                &count_s,
                &from,
            ],
            None,
            n,
            lines.clone(),
        )
    };
    let mut workers: Vec<Child> = (0..WORKERS).map(spawn_worker).collect::<Result<_>>()?;
    let mut ids: Vec<usize> = (0..WORKERS).collect();
    let mut submitter = Some(spawn_submitter(WORKERS, 0)?);
    let mut next = WORKERS + 1;
    let mut chaos = Chaos::default();
    let mut seen: Vec<(usize, String)> = Vec::new();
    let mut dice = Dice::seeded();
    let until = Instant::now() + length;
    let outcome = (|| -> Result<Option<Duration>> {
        while Instant::now() < until && !crate::interrupted() {
            thread::sleep(Duration::from_millis(700 + dice.below(1300)));
            seen.extend(events.try_iter());
            if let Some(s) = submitter.as_mut().filter(|_| dice.below(6) == 0) {
                if s.try_wait()?.is_none() {
                    let _ = signal::kill(Pid::from_raw(s.id() as i32), signal::Signal::SIGKILL);
                    let _ = s.wait();
                    seen.extend(events.try_iter());
                    submitter = Some(spawn_submitter(next, first_unconfirmed(&seen))?);
                    next += 1;
                    chaos.submitter_kills += 1;
                    continue;
                }
            }
            // Stops aim at workers in the middle of an attempt, kills at anyone.
            let busy: Vec<usize> = (0..WORKERS)
                .filter(|slot| is_busy(&seen, ids[*slot]))
                .collect();
            let stop = dice.below(2) == 0;
            let slot = match stop && !busy.is_empty() {
                true => busy[dice.below(busy.len() as u64) as usize],
                false => dice.below(WORKERS as u64) as usize,
            };
            let pid = Pid::from_raw(workers[slot].id() as i32);
            if stop {
                let from = now_us();
                let _ = signal::kill(pid, signal::Signal::SIGSTOP);
                thread::sleep(lease.stop_for);
                let _ = signal::kill(pid, signal::Signal::SIGCONT);
                chaos
                    .stops
                    .entry(ids[slot])
                    .or_default()
                    .push((from, now_us()));
            } else {
                let _ = signal::kill(pid, signal::Signal::SIGKILL);
                let _ = workers[slot].wait();
                chaos.kills.insert(ids[slot], now_us());
                workers[slot] = spawn_worker(next)?;
                ids[slot] = next;
                next += 1;
            }
        }
        // Chaos over: the submitter finishes its schedule (it may have been restarted late).
        if let Some(mut s) = submitter.take() {
            let deadline = Instant::now() + span + Duration::from_secs(30);
            let status = loop {
                if let Some(status) = s.try_wait()? {
                    break status;
                }
                if Instant::now() > deadline || crate::interrupted() {
                    let _ = s.kill();
                    let _ = s.wait();
                    bail!("drill task: the submitter did not finish its schedule");
                }
                thread::sleep(Duration::from_millis(100));
            };
            if !status.success() {
                bail!("drill task: the submitter failed ({status})");
            }
        }
        // It printed a SUBMIT line for every job: wait until they have all come through.
        let deadline = Instant::now() + Duration::from_secs(10);
        while first_unconfirmed(&seen) < count && Instant::now() < deadline {
            if let Ok(line) = events.recv_timeout(Duration::from_millis(100)) {
                seen.push(line);
            }
            seen.extend(events.try_iter());
        }
        // The drain: a fresh client waits for every job submitted.
        let submitted: BTreeSet<&str> = seen
            .iter()
            .filter_map(|(_, l)| l.strip_prefix("SUBMIT "))
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        let stdin: String = submitted.iter().map(|id| format!("{id}\n")).collect();
        let started = Instant::now();
        let drain_s = drain.as_secs().to_string();
        let mut checker = spawn(
            worker,
            &[&url, "task-check", QUEUE, &drain_s],
            Some(stdin),
            next,
            lines.clone(),
        )?;
        let deadline = started + drain + Duration::from_secs(15);
        while checker.try_wait()?.is_none() {
            if Instant::now() > deadline || crate::interrupted() {
                let _ = checker.kill();
                let _ = checker.wait();
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Some(started.elapsed()))
    })();
    for w in workers.iter_mut().chain(submitter.as_mut()) {
        let _ = w.kill();
        let _ = w.wait();
    }
    let drained_in = outcome?;
    drop(lines);
    seen.extend(events);
    let mut verdict = judge(seen, &chaos);
    if drained_in.is_none() {
        verdict
            .violations
            .push("the final check did not finish within the drain time".to_string());
    }
    verdict.print(&chaos, drained_in);
    Ok(if verdict.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// How long the final check may wait for the queue to drain: a job whose worker was killed
/// last comes back after its claim expires, which may take two TTLs (Consul invalidates
/// lazily), and then runs; so at least four TTLs, and 20–60 s.
fn drain_time(length: Duration, lease: Lease) -> Duration {
    let floor = (lease.ttl * 4).max(Duration::from_secs(20));
    length.clamp(floor, floor.max(Duration::from_secs(60)))
}

/// Starts `bin` with `args`, feeding it `stdin` (then closing it) and sending each line it
/// prints, tagged `id`, to `lines`. A worker's stderr is dropped; the others' shows.
fn spawn(
    bin: &Path,
    args: &[&str],
    stdin: Option<String>,
    id: usize,
    lines: mpsc::Sender<(usize, String)>,
) -> Result<Child> {
    // The workers' errors are the chaos's doing; the submitter's and the check's are worth
    // seeing.
    let quiet = args.get(1) == Some(&"task");
    let mut child = Command::new(bin)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(if quiet {
            Stdio::null()
        } else {
            Stdio::inherit()
        })
        .spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        thread::spawn(move || {
            let _ = pipe.write_all(text.as_bytes());
        });
    }
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

/// The lowest job number whose submit no SUBMIT line confirmed yet: where a restarted
/// submitter resumes (a line still in a pipe only makes it start earlier, never later).
fn first_unconfirmed(lines: &[(usize, String)]) -> u64 {
    let confirmed: BTreeSet<u64> = lines
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("SUBMIT "))
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .strip_prefix(QUEUE)?
                .strip_prefix('-')
        })
        .filter_map(|n| n.parse().ok())
        .collect();
    (0..).find(|n| !confirmed.contains(n)).unwrap_or(0)
}

/// Whether `worker` has an attempt under way: more STARTs than DONEs and LOSTs.
fn is_busy(lines: &[(usize, String)], worker: usize) -> bool {
    let mut open = 0i64;
    for (_, line) in lines.iter().filter(|(w, _)| *w == worker) {
        match line.split_whitespace().next() {
            Some("START") => open += 1,
            Some("DONE" | "LOST") => open -= 1,
            _ => {}
        }
    }
    open > 0
}

/// One attempt as its worker's lines tell it.
#[derive(Debug, Clone)]
struct Attempt {
    worker: usize,
    token: u64,
    start: u128,
    /// DONE or LOST, and when.
    end: Option<(bool, u128)>,
}

impl Attempt {
    fn done(&self) -> bool {
        matches!(self.end, Some((true, _)))
    }
    fn reported_lost(&self) -> bool {
        matches!(self.end, Some((false, _)))
    }
}

/// What the final check said of a job.
#[derive(Debug, Clone)]
struct Status {
    state: String,
    attempts: u32,
    output: Option<u64>,
}

/// What the lines say.
#[derive(Default)]
struct Verdict {
    submitted: usize,
    submits: usize,
    starts: usize,
    done: usize,
    reruns: usize,
    lost_seen: usize,
    lost: usize,
    duplicated: usize,
    stuck: usize,
    fencing: usize,
    violations: Vec<String>,
}

impl Verdict {
    fn print(&self, chaos: &Chaos, drained_in: Option<Duration>) {
        let stops: usize = chaos.stops.values().map(Vec::len).sum();
        let drained = match drained_in {
            Some(d) => fmt_duration(d),
            None => "timed out".to_string(),
        };
        let rows = [
            ("jobs submitted (keys)", self.submitted.to_string()),
            ("submits, resubmits included", self.submits.to_string()),
            ("attempts started", self.starts.to_string()),
            ("jobs done", self.done.to_string()),
            ("re-runs after a lost claim", self.reruns.to_string()),
            (
                "handlers that saw their loss (LOST)",
                self.lost_seen.to_string(),
            ),
            ("jobs lost", self.lost.to_string()),
            ("jobs duplicated", self.duplicated.to_string()),
            ("jobs stuck", self.stuck.to_string()),
            ("fencing violations", self.fencing.to_string()),
            ("workers killed (-9)", chaos.kills.len().to_string()),
            ("workers stopped past the TTL", stops.to_string()),
            (
                "submitter killed and restarted",
                chaos.submitter_kills.to_string(),
            ),
            ("final check (drain) took", drained),
            ("violations", self.violations.len().to_string()),
        ];
        say!("drill task summary:");
        for (what, n) in rows {
            eprintln!("  {what:<48} {n:>8}");
        }
        for v in self.violations.iter().take(50) {
            say!("VIOLATION: {v}");
        }
        if self.violations.len() > 50 {
            say!("… and {} more violations", self.violations.len() - 50);
        }
    }
}

/// Judges the lines of every process (submitters, workers, the check) against what the chaos
/// did; see the module documentation for the rules.
fn judge(lines: Vec<(usize, String)>, chaos: &Chaos) -> Verdict {
    let mut v = Verdict::default();
    let mut ids_of_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut attempts: BTreeMap<String, Vec<Attempt>> = BTreeMap::new();
    let mut statuses: HashMap<String, Status> = HashMap::new();
    // Time order, so an attempt's end finds its start.
    let mut parsed: Vec<(u128, usize, usize, Vec<String>)> = Vec::new();
    for (seq, (worker, line)) in lines.into_iter().enumerate() {
        let parts: Vec<String> = line.split_whitespace().map(String::from).collect();
        let Some(at) = parts.last().and_then(|t| t.parse::<u128>().ok()) else {
            continue;
        };
        parsed.push((at, seq, worker, parts));
    }
    parsed.sort();
    for (at, _, worker, parts) in parsed {
        let p: Vec<&str> = parts.iter().map(String::as_str).collect();
        match p.as_slice() {
            ["SUBMIT", key, id, _] => {
                v.submits += 1;
                ids_of_key
                    .entry(key.to_string())
                    .or_default()
                    .insert(id.to_string());
            }
            ["START", job, token, _] => {
                let Ok(token) = token.parse() else { continue };
                v.starts += 1;
                attempts.entry(job.to_string()).or_default().push(Attempt {
                    worker,
                    token,
                    start: at,
                    end: None,
                });
            }
            [kind @ ("DONE" | "LOST"), job, token, _] => {
                let Ok(token) = token.parse::<u64>() else {
                    continue;
                };
                let of_job = attempts.entry(job.to_string()).or_default();
                match of_job
                    .iter_mut()
                    .rev()
                    .find(|a| a.worker == worker && a.token == token && a.end.is_none())
                {
                    Some(a) => a.end = Some((*kind == "DONE", at)),
                    None => v.violations.push(format!(
                        "worker {worker} printed {kind} for job {job} token {token} without a START"
                    )),
                }
                if *kind == "LOST" {
                    v.lost_seen += 1;
                }
            }
            ["STATUS", id, state, n, output, _] => {
                statuses.insert(
                    id.to_string(),
                    Status {
                        state: state.to_string(),
                        attempts: n.parse().unwrap_or(0),
                        output: output.parse().ok(),
                    },
                );
            }
            _ => {}
        }
    }
    v.submitted = ids_of_key.len();
    let mut jobs: BTreeSet<String> = BTreeSet::new();
    for (key, ids) in &ids_of_key {
        if ids.len() > 1 {
            v.duplicated += 1;
            v.violations.push(format!(
                "key {key} was submitted as {} jobs: {ids:?}",
                ids.len()
            ));
        }
        jobs.extend(ids.iter().cloned());
    }
    for job in attempts.keys().filter(|j| !jobs.contains(*j)) {
        v.violations
            .push(format!("job {job} ran but no submit returned its id"));
    }
    let killed_by = |worker: usize, at: u128| chaos.kills.get(&worker).is_some_and(|k| *k <= at);
    let stopped_within = |worker: usize, from: u128, to: u128| {
        chaos
            .stops
            .get(&worker)
            .is_some_and(|s| s.iter().any(|(f, t)| *f <= to && *t >= from))
    };
    for job in &jobs {
        let mut runs = attempts.get(job).cloned().unwrap_or_default();
        runs.sort_by_key(|a| (a.token, a.start));
        let mut duplicated = false;
        for pair in runs.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if a.token == b.token {
                v.fencing += 1;
                v.violations.push(format!(
                    "job {job}: token {} was claimed twice (workers {} and {})",
                    a.token, a.worker, b.worker
                ));
                continue;
            }
            // The claim with the higher token started first: only a stop of the lower one's
            // worker, between its claim and its START line, explains that — a stop begun
            // before the other START and ended just before its own (`to` is read after the
            // SIGCONT, so it may come a little after).
            let delayed_by_stop = |(from, to): &(u128, u128)| {
                *from < b.start && *to <= a.start + SLACK_US && *to + 2_000_000 >= a.start
            };
            if b.start < a.start
                && !chaos
                    .stops
                    .get(&a.worker)
                    .is_some_and(|s| s.iter().any(delayed_by_stop))
            {
                v.fencing += 1;
                v.violations.push(format!(
                    "job {job}: token {} (worker {}) started at {} before token {} (worker {}) at {}: the re-run's token is not above the previous claim's",
                    b.token, b.worker, b.start, a.token, a.worker, a.start
                ));
            }
            let (from, to) = (a.start.min(b.start), a.start.max(b.start));
            if a.reported_lost() || killed_by(a.worker, to) || stopped_within(a.worker, from, to) {
                v.reruns += 1;
                continue;
            }
            duplicated = true;
            v.violations.push(match a.end {
                Some((true, done)) if done < b.start => format!(
                    "job {job} ran again (token {} by worker {}) after worker {}, never killed or stopped, had done it (token {})",
                    b.token, b.worker, a.worker, a.token
                ),
                _ => format!(
                    "job {job}: worker {} claimed it (token {}) while worker {}, never killed or stopped, still ran it (token {})",
                    b.worker, b.token, a.worker, a.token
                ),
            });
        }
        // DONE's time is read before the loss check: a stop that began (plus the slack for the
        // signal to land) before it and ended after START lasted past the TTL before the check.
        for a in runs.iter().filter(|a| a.done()) {
            let done = a.end.map_or(a.start, |(_, at)| at);
            let paused = chaos.stops.get(&a.worker).is_some_and(|s| {
                s.iter()
                    .any(|(from, to)| *to >= a.start && from + SLACK_US <= done)
            });
            if paused {
                v.fencing += 1;
                v.violations.push(format!(
                    "job {job}: worker {} was stopped past the TTL during its attempt (token {}) and finished it without seeing its loss",
                    a.worker, a.token
                ));
            }
        }
        let status = statuses.get(job);
        match status.map(|s| s.state.as_str()) {
            Some("Succeeded") => {
                v.done += 1;
                let output = status.and_then(|s| s.output);
                let last = runs.last();
                if output.is_none() || output != last.map(|a| a.token) {
                    duplicated = true;
                    v.violations.push(format!(
                        "job {job} succeeded with the outcome of token {output:?}, but its last claim was token {:?}",
                        last.map(|a| a.token)
                    ));
                } else if !last.is_some_and(Attempt::done) {
                    v.violations.push(format!(
                        "job {job} succeeded with token {output:?}, whose attempt never printed DONE"
                    ));
                }
            }
            Some("Queued" | "Running") => {
                v.stuck += 1;
                v.violations.push(format!(
                    "job {job} is stuck: still {} after the drain",
                    status.map_or("", |s| s.state.as_str())
                ));
            }
            other => {
                v.lost += 1;
                v.violations.push(match other {
                    None => format!("job {job} is lost: the final check gave no status"),
                    Some(state) => format!("job {job} is lost: its status is {state}"),
                });
            }
        }
        if let Some(s) = status.filter(|s| (s.attempts as usize) < runs.len()) {
            v.violations.push(format!(
                "job {job} reports {} attempts, but {} were started",
                s.attempts,
                runs.len()
            ));
        }
        if duplicated {
            v.duplicated += 1;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(worker: usize, text: &str) -> (usize, String) {
        (worker, text.to_string())
    }

    /// One job, `j-0`, submitted by process 9 and checked by process 10.
    fn one_job(mut body: Vec<(usize, String)>, status: &str) -> Vec<(usize, String)> {
        let mut lines = vec![line(9, "SUBMIT j-0 j-0 50")];
        lines.append(&mut body);
        lines.push(line(10, &format!("STATUS j-0 {status} 99999")));
        lines
    }

    #[test]
    fn a_clean_run_and_a_rerun_after_a_kill_pass() {
        let clean = one_job(
            vec![line(0, "START j-0 10 100"), line(0, "DONE j-0 10 200")],
            "Succeeded 1 10",
        );
        let v = judge(clean, &Chaos::default());
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!((v.submitted, v.done, v.reruns), (1, 1, 0));

        // Worker 0 is killed mid-attempt; worker 1 runs the job again with a higher token.
        let rerun = one_job(
            vec![
                line(0, "START j-0 10 100"),
                line(1, "START j-0 20 3000"),
                line(1, "DONE j-0 20 3100"),
            ],
            "Succeeded 2 20",
        );
        let chaos = Chaos {
            kills: HashMap::from([(0, 150)]),
            ..Chaos::default()
        };
        let v = judge(rerun, &chaos);
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!((v.done, v.reruns), (1, 1));
    }

    #[test]
    fn a_stopped_worker_must_see_its_loss() {
        // Worker 0 is stopped for 3 s (times in µs) in the middle of its attempt; worker 1 runs
        // the job again meanwhile; worker 0 then reports its loss, or misses it.
        let body = |end: &str| {
            vec![
                line(0, "START j-0 10 1000000"),
                line(1, "START j-0 20 3600000"),
                line(1, "DONE j-0 20 3700000"),
                line(0, &format!("{end} j-0 10 4200000")),
            ]
        };
        let chaos = Chaos {
            stops: HashMap::from([(0, vec![(1100000, 4100000)])]),
            ..Chaos::default()
        };
        let noticed = judge(one_job(body("LOST"), "Succeeded 2 20"), &chaos);
        assert!(noticed.violations.is_empty(), "{:?}", noticed.violations);
        assert_eq!((noticed.reruns, noticed.lost_seen), (1, 1));
        let unnoticed = judge(one_job(body("DONE"), "Succeeded 2 20"), &chaos);
        assert_eq!(unnoticed.fencing, 1, "{:?}", unnoticed.violations);
        assert_eq!(unnoticed.violations.len(), 1, "{:?}", unnoticed.violations);
        // A stop that landed only after the DONE's time was read is no pause of the attempt.
        let late = Chaos {
            stops: HashMap::from([(0, vec![(4199990, 7200000)])]),
            ..Chaos::default()
        };
        let fine = judge(
            one_job(
                vec![
                    line(0, "START j-0 10 1000000"),
                    line(0, "DONE j-0 10 4200000"),
                ],
                "Succeeded 1 10",
            ),
            &late,
        );
        assert!(fine.violations.is_empty(), "{:?}", fine.violations);
    }

    #[test]
    fn a_rerun_beside_or_after_a_live_worker_is_a_duplicate() {
        // Overlapping: worker 1 claims while worker 0, never stopped, still runs it.
        let overlap = one_job(
            vec![
                line(0, "START j-0 10 100"),
                line(1, "START j-0 20 150"),
                line(0, "DONE j-0 10 200"),
                line(1, "DONE j-0 20 250"),
            ],
            "Succeeded 2 20",
        );
        let v = judge(overlap, &Chaos::default());
        assert_eq!(v.duplicated, 1, "{:?}", v.violations);
        assert_eq!(v.reruns, 0);
        // After it was done, by a live worker, and the outcome recorded is the first one.
        let again = one_job(
            vec![
                line(0, "START j-0 10 100"),
                line(0, "DONE j-0 10 200"),
                line(1, "START j-0 20 5000"),
                line(1, "DONE j-0 20 5100"),
            ],
            "Succeeded 2 10",
        );
        let v = judge(again, &Chaos::default());
        assert_eq!(v.duplicated, 1);
        assert_eq!(v.violations.len(), 2, "{:?}", v.violations);
        // A key that yielded two job ids.
        let mut two_ids = one_job(
            vec![line(0, "START j-0 10 100"), line(0, "DONE j-0 10 200")],
            "Succeeded 1 10",
        );
        two_ids.push(line(9, "SUBMIT j-0 other 60"));
        let v = judge(two_ids, &Chaos::default());
        assert!(v.duplicated >= 1, "{:?}", v.violations);
        assert!(
            v.violations.iter().any(|e| e.contains("2 jobs")),
            "{:?}",
            v.violations
        );
    }

    #[test]
    fn lost_and_stuck_jobs_are_violations() {
        for (status, lost, stuck) in [
            ("Failed 100 -", 1, 0),
            ("NotFound 0 -", 1, 0),
            ("Error 0 -", 1, 0),
            ("Queued 3 -", 0, 1),
            ("Running 3 -", 0, 1),
        ] {
            let v = judge(one_job(vec![], status), &Chaos::default());
            assert_eq!((v.lost, v.stuck), (lost, stuck), "{status}");
            assert_eq!(v.violations.len(), 1, "{status}: {:?}", v.violations);
        }
        // No status at all: the check never answered for it.
        let v = judge(vec![line(9, "SUBMIT j-0 j-0 50")], &Chaos::default());
        assert_eq!(v.lost, 1);
    }

    #[test]
    fn the_drain_outlasts_a_dead_workers_claim() {
        let short = Lease::of("etcd://h:1");
        let consul = Lease::of("consul://h:1");
        let secs = |d: Duration| d.as_secs();
        assert_eq!(secs(drain_time(Duration::from_secs(12), short)), 20);
        assert_eq!(secs(drain_time(Duration::from_secs(600), short)), 60);
        assert_eq!(secs(drain_time(Duration::from_secs(12), consul)), 40);
        assert_eq!(secs(drain_time(Duration::from_secs(600), consul)), 60);
    }

    #[test]
    fn a_restarted_submitter_resumes_at_the_first_unconfirmed_job() {
        let lines = vec![
            line(4, "SUBMIT drill-0 drill-0 1"),
            line(4, "SUBMIT drill-1 drill-1 2"),
            line(4, "SUBMIT drill-3 drill-3 3"),
            line(0, "START drill-0 7 4"),
        ];
        assert_eq!(first_unconfirmed(&lines), 2);
        assert_eq!(first_unconfirmed(&[]), 0);
    }

    #[test]
    fn tokens_must_rise_with_each_claim() {
        // The later claim (by start time) carries the lower token, and no stop explains it.
        let back = one_job(
            vec![
                line(0, "START j-0 20 100"),
                line(1, "START j-0 10 3000"),
                line(1, "DONE j-0 10 3100"),
            ],
            "Succeeded 2 20",
        );
        let chaos = Chaos {
            kills: HashMap::from([(0, 150)]),
            ..Chaos::default()
        };
        let v = judge(back, &chaos);
        assert!(v.fencing >= 1, "{:?}", v.violations);
        // The same, but worker 1 was stopped between its claim and its START line: fine.
        let delayed = one_job(
            vec![
                line(0, "START j-0 20 100"),
                line(0, "DONE j-0 20 200"),
                line(1, "START j-0 10 3000"),
                line(1, "LOST j-0 10 3100"),
            ],
            "Succeeded 2 20",
        );
        let chaos = Chaos {
            stops: HashMap::from([(1, vec![(0, 2990)])]),
            ..Chaos::default()
        };
        let v = judge(delayed, &chaos);
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        // One token claimed twice.
        let twice = one_job(
            vec![
                line(0, "START j-0 10 100"),
                line(1, "START j-0 10 3000"),
                line(1, "DONE j-0 10 3100"),
            ],
            "Succeeded 2 10",
        );
        let chaos = Chaos {
            kills: HashMap::from([(0, 150)]),
            ..Chaos::default()
        };
        assert_eq!(judge(twice, &chaos).fencing, 1);
    }
}
