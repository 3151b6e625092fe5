//! `syncctl lock`: mutual exclusion between processes, a SIGKILLed holder's lock handed over
//! only once its lease ends, and a lock lost from outside ending the command (status 122).

use std::time::Duration;

use tokio::{task::JoinSet, time::Instant};

use crate::{
    harness::{Case, Live, TestResult},
    procs::{Proc, Scratch, alive, group_member, output, pid_in, poll, syncctl},
    services::{self, unique},
};

/// How long a holder may take to connect and acquire a free lock.
const STARTUP: Duration = Duration::from_secs(15);

pub fn cases(out: &mut Vec<Case>) {
    let name = |test: &str, live: Live| format!("lock::{test}::{}", live.name());
    for live in [Live::Etcd, Live::Redis, Live::RedisCluster, Live::Consul] {
        out.push(Case::live(
            name("six_loops_never_overlap", live),
            live,
            six_loops_never_overlap,
        ));
    }
    for live in [Live::Etcd, Live::Redis, Live::Consul] {
        out.push(Case::live(
            name("killed_holder_hands_over_after_ttl", live),
            live,
            move |base| killed_holder_hands_over_after_ttl(live, base),
        ));
        out.push(Case::live(
            name("lost_lock_terminates_child", live),
            live,
            move |base| lost_lock_terminates_child(live, base, Hold::Lock, OnTerm::Exit),
        ));
        out.push(Case::live(
            format!("elect::lost_leadership_terminates_child::{}", live.name()),
            live,
            move |base| lost_lock_terminates_child(live, base, Hold::Elect, OnTerm::Exit),
        ));
    }
    out.push(Case::live(
        name("lost_lock_kills_child_ignoring_term", Live::Etcd),
        Live::Etcd,
        |base| lost_lock_terminates_child(Live::Etcd, base, Hold::Lock, OnTerm::Ignore),
    ));
    for live in [Live::Etcd, Live::Redis] {
        out.push(Case::live(
            name("paused_past_the_ttl_ends_the_command", live),
            live,
            move |base| paused_past_the_ttl_ends_the_command(live, base),
        ));
    }
    out.push(Case::live(
        name("loss_found_at_release_is_122", Live::Redis),
        Live::Redis,
        loss_found_at_release_is_122,
    ));
    out.push(Case::live(
        name("leftovers_end_before_release", Live::Etcd),
        Live::Etcd,
        leftovers_end_before_release,
    ));
    out.push(Case::live(
        name("an_ignored_hangup_stays_ignored", Live::Etcd),
        Live::Etcd,
        an_ignored_hangup_stays_ignored,
    ));
    out.push(Case::live(
        name("signal_while_waiting_starts_nothing", Live::Etcd),
        Live::Etcd,
        signal_while_waiting_starts_nothing,
    ));
}

/// What a holder holds: a lock, or the leadership of a group.
#[derive(Clone, Copy)]
enum Hold {
    Lock,
    Elect,
}

impl Hold {
    /// syncctl's arguments up to the flags.
    fn args(self) -> &'static [&'static str] {
        match self {
            Hold::Lock => &["lock", "X"],
            Hold::Elect => &["elect", "X", "--id", "me"],
        }
    }
}

/// The lease a backend's holders get: the shortest TTL it grants, and for Consul a 1 s
/// lock-delay (in the URL query) instead of its 15 s default.
struct Lease {
    ttl: Duration,
    lock_delay: Duration,
    query: &'static str,
}

fn lease(live: Live) -> Lease {
    let (ttl, lock_delay, query) = match live {
        Live::Consul => (10, 1, "lock_delay=1s"),
        _ => (2, 0, ""),
    };
    Lease {
        ttl: Duration::from_secs(ttl),
        lock_delay: Duration::from_secs(lock_delay),
        query,
    }
}

/// A duration as syncctl's flags take it (whole seconds here).
fn flag(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// Each hold logs its start and end with its fencing token and the time; `>>` opens the log
/// with O_APPEND, so each line lands whole and the file's order is the true order.
const LOGGED_HOLD: &str = r#"echo "start $SYNC_FENCING_TOKEN $(date +%s.%N)" >> "$LOG"; sleep 0.05; echo "end $SYNC_FENCING_TOKEN $(date +%s.%N)" >> "$LOG""#;

/// 6 loops, each running `syncctl lock X -- <logged hold>` 4 times in a row: every syncctl
/// succeeds, and the log is 24 holds one after another, with rising fencing tokens.
async fn six_loops_never_overlap(base: String) -> TestResult {
    const LOOPS: usize = 6;
    const ROUNDS: usize = 4;
    let scratch = Scratch::new()?;
    let url = services::url(&base, &unique("six"), "");
    let log = scratch.path("log");
    let mut loops = JoinSet::new();
    for _ in 0..LOOPS {
        let (url, log) = (url.clone(), log.clone());
        loops.spawn(async move {
            for _ in 0..ROUNDS {
                let mut command =
                    syncctl(Some(&url), &["lock", "X", "--", "sh", "-c", LOGGED_HOLD]);
                command.env("LOG", &log);
                output(command, Duration::from_secs(40)).await?.ok()?;
            }
            Ok::<_, String>(())
        });
    }
    // A failed loop returns at once; dropping the others kills their syncctl.
    while let Some(done) = loops.join_next().await {
        done.map_err(|e| format!("a loop panicked: {e}"))??;
    }
    let text = std::fs::read_to_string(&log).map_err(|e| format!("reading the log: {e}"))?;
    check_log(&text, LOOPS * ROUNDS)
        .map_err(|why| format!("{why}; the log (event, token, time):\n{text}"))
}

/// "EVENT TOKEN TIME": the event and the token.
fn parse(line: &str) -> Option<(&str, u64)> {
    let mut words = line.split(' ');
    let event = words.next()?;
    let token = words.next()?.parse().ok()?;
    words.next()?;
    Some((event, token))
}

/// `holds` pairs of "start T time" / "end T time", strictly alternating with the same token,
/// and the tokens strictly rising.
fn check_log(text: &str, holds: usize) -> TestResult {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != 2 * holds {
        return Err(format!("{} lines, not {}", lines.len(), 2 * holds));
    }
    let mut last = None;
    for (i, pair) in lines.chunks(2).enumerate() {
        let token = match (parse(pair[0]), parse(pair[1])) {
            (Some(("start", a)), Some(("end", b))) if a == b => a,
            _ => {
                return Err(format!(
                    "lines {} and {} are not one hold's start and end: holds overlapped \
                     (or a token is missing)",
                    2 * i + 1,
                    2 * i + 2
                ));
            }
        };
        if let Some(before) = last.filter(|&before| token <= before) {
            return Err(format!(
                "hold {} has token {token}, not above the previous {before}",
                i + 1
            ));
        }
        last = Some(token);
    }
    Ok(())
}

/// A holder whose syncctl is SIGKILLed: its command dies with it (PR_SET_PDEATHSIG), and a
/// waiter gets the lock only after the dead holder's lease ended, within 2 TTL + lock-delay.
async fn killed_holder_hands_over_after_ttl(live: Live, base: String) -> TestResult {
    let lease = lease(live);
    let scratch = Scratch::new()?;
    let url = services::url(&base, &unique("killed"), lease.query);
    let pidfile = scratch.path("pid");
    let ttl = flag(lease.ttl);
    let hold = r#"echo $$ > "$PIDFILE"; exec sleep 60"#;
    let mut command = syncctl(
        Some(&url),
        &["lock", "X", "--ttl", &ttl, "--", "sh", "-c", hold],
    );
    command.env("PIDFILE", &pidfile);
    let mut holder = Proc::spawn(&scratch, command)?;
    let child = pid_in(&pidfile, &mut holder, STARTUP).await?;
    let wait = ["lock", "X", "--wait", "60s", "--", "sh", "-c", "echo got"];
    let mut waiter = Proc::spawn(&scratch, syncctl(Some(&url), &wait))?;
    waiter
        .keeps_running_for(Duration::from_millis(300))
        .await
        .map_err(|e| format!("the waiter, while the lock was held: {e}"))?;
    holder.kill()?;
    let killed = Instant::now();
    holder.exits_within(Duration::from_secs(5)).await?;
    if poll(Duration::from_secs(2), || (!alive(child)).then_some(()))
        .await
        .is_none()
    {
        return Err(format!(
            "the holder's command (pid {child}) still runs 2s after its syncctl was SIGKILLed"
        ));
    }
    // Consul invalidates a session between TTL and 2 TTL after its last renewal.
    let upper = 2 * lease.ttl + lease.lock_delay + Duration::from_secs(5);
    waiter
        .exits_with(0, upper.saturating_sub(killed.elapsed()))
        .await
        .map_err(|e| format!("the waiter, after the holder was killed: {e}"))?;
    let took = killed.elapsed();
    if !waiter.stdout().contains("got") {
        return Err(format!(
            "the waiter's command did not run: {}",
            waiter.said()
        ));
    }
    // The holder renews at least every TTL/2 (etcd and redis every TTL/3, consul TTL/2), and
    // it held the lock when killed: its last renewal was at most ~TTL/2 before the kill, and
    // the backend keeps the lease a whole TTL after a renewal (Consul then adds the
    // lock-delay). So no grant may come before TTL/2 + lock-delay after the kill; 250 ms off
    // for a renewal's round trip and scheduling. (At least 0.75 s with these TTLs.)
    let lower = lease.ttl / 2 + lease.lock_delay - Duration::from_millis(250);
    if took < lower {
        return Err(format!(
            "the waiter got the lock {took:?} after the holder was killed, while the dead \
             holder's lease must have lived {lower:?} at least: {}",
            waiter.said()
        ));
    }
    println!(
        "measured ({}): the waiter got the lock {took:?} after the holder was SIGKILLed (TTL \
         {:?}, lock-delay {:?})",
        live.name(),
        lease.ttl,
        lease.lock_delay
    );
    Ok(())
}

/// What the holder's command does on SIGTERM.
#[derive(Clone, Copy)]
enum OnTerm {
    /// Notes it in a file and exits 0.
    Exit,
    /// Nothing: it ignores it (and so does its `sleep`, which inherits that).
    Ignore,
}

/// A lock made lost from outside (its lease revoked, its key deleted, its session destroyed):
/// the command gets SIGTERM (SIGKILL after --grace if it ignores it) and syncctl exits 122.
async fn lost_lock_terminates_child(
    live: Live,
    base: String,
    hold: Hold,
    on_term: OnTerm,
) -> TestResult {
    const GRACE: Duration = Duration::from_secs(3);
    let lease = lease(live);
    let scratch = Scratch::new()?;
    let ns = unique("lost");
    let url = services::url(&base, &ns, lease.query);
    let (ready, termed) = (scratch.path("ready"), scratch.path("termed"));
    let trap = match on_term {
        OnTerm::Exit => r#"trap 'echo term >> "$F"; exit 0' TERM"#,
        OnTerm::Ignore => "trap '' TERM",
    };
    let script = format!(r#"{trap}; echo $$ > "$R"; while :; do sleep 0.1; done"#);
    let (ttl, grace) = (flag(lease.ttl), flag(GRACE));
    let flags = ["--ttl", &ttl, "--grace", &grace, "--", "sh", "-c", &script];
    let mut command = syncctl(Some(&url), &[hold.args(), &flags[..]].concat());
    command.env("R", &ready).env("F", &termed);
    let mut holder = Proc::spawn(&scratch, command)?;
    // The command leads its own process group (syncctl's stdin is no terminal).
    let child = pid_in(&ready, &mut holder, STARTUP).await?;
    holder.running()?;
    let broken = Instant::now();
    let how = services::break_holds(live, &base, &ns).await?;
    holder
        .exits_with(122, lease.ttl + GRACE + Duration::from_secs(5))
        .await
        .map_err(|e| format!("after the lock was lost ({how}): {e}"))?;
    let took = broken.elapsed();
    match on_term {
        OnTerm::Exit => {
            let noted = std::fs::read_to_string(&termed).unwrap_or_default();
            if !noted.contains("term") {
                return Err(format!(
                    "the command got no SIGTERM (it notes one in a file, which holds \
                     {noted:?}): {}",
                    holder.said()
                ));
            }
        }
        // syncctl sends SIGKILL GRACE after SIGTERM, which comes after the loss, which
        // comes after `broken`: an earlier exit did not wait the grace period.
        OnTerm::Ignore if took < GRACE => {
            return Err(format!(
                "syncctl exited {took:?} after the lock was lost, before the grace period \
                 {GRACE:?} ended: {}",
                holder.said()
            ));
        }
        OnTerm::Ignore => {}
    }
    if let Some(pid) = group_member(child) {
        return Err(format!(
            "process {pid} of the command's group {child} still runs after syncctl exited"
        ));
    }
    println!(
        "measured ({}): syncctl exited 122 {took:?} after {how}",
        live.name()
    );
    Ok(())
}

/// A waiter that gets SIGTERM while it waits exits 143 and never starts its command; while it
/// waited, its progress line named the holder (etcd: its lease and token).
async fn signal_while_waiting_starts_nothing(base: String) -> TestResult {
    let scratch = Scratch::new()?;
    let url = services::url(&base, &unique("waiting"), "");
    let (pidfile, marker) = (scratch.path("pid"), scratch.path("marker"));
    let mut command = syncctl(
        Some(&url),
        &[
            "lock",
            "X",
            "--",
            "sh",
            "-c",
            r#"echo $$ > "$P"; exec sleep 60"#,
        ],
    );
    command.env("P", &pidfile);
    let mut holder = Proc::spawn(&scratch, command)?;
    pid_in(&pidfile, &mut holder, STARTUP).await?;
    let mut command = syncctl(
        Some(&url),
        &["lock", "X", "--", "sh", "-c", r#"touch "$M""#],
    );
    command.env("M", &marker);
    let mut waiter = Proc::spawn(&scratch, command)?;
    let progress = poll(STARTUP, || {
        waiter.stderr().contains("waiting for").then_some(())
    })
    .await;
    if progress.is_none() {
        return Err(format!("the waiter said no progress: {}", waiter.said()));
    }
    let said = waiter.stderr();
    if !said.contains("held by etcd lease") || !said.contains("(token ") {
        return Err(format!(
            "the progress line does not name the holder: {said:?}"
        ));
    }
    waiter.signal("TERM").await?;
    waiter.exits_with(143, Duration::from_secs(10)).await?;
    if marker.exists() {
        return Err("the waiter ran its command after it was told to stop".into());
    }
    // The holder's SIGTERM reaches its command; syncctl then exits with its status.
    holder.signal("TERM").await?;
    holder.exits_with(143, Duration::from_secs(10)).await
}

/// syncctl stopped (SIGSTOP) for longer than its TTL while its command runs: once it runs
/// again, the lock's safe deadline has passed, so it ends the command (SIGTERM) and exits 122
/// at once, without waiting to hear from the backend.
async fn paused_past_the_ttl_ends_the_command(live: Live, base: String) -> TestResult {
    let lease = lease(live);
    let scratch = Scratch::new()?;
    let url = services::url(&base, &unique("paused"), lease.query);
    let (ready, termed) = (scratch.path("ready"), scratch.path("termed"));
    let script =
        r#"trap 'echo term >> "$F"; exit 0' TERM; echo $$ > "$R"; while :; do sleep 0.1; done"#;
    let ttl = flag(lease.ttl);
    let args = ["lock", "X", "--ttl", &ttl, "--", "sh", "-c", script];
    let mut command = syncctl(Some(&url), &args);
    command.env("R", &ready).env("F", &termed);
    let mut holder = Proc::spawn(&scratch, command)?;
    pid_in(&ready, &mut holder, STARTUP).await?;
    holder.signal("STOP").await?;
    // The fault itself: a pause of a known length, past the TTL.
    tokio::time::sleep(lease.ttl + Duration::from_millis(1500)).await;
    holder.signal("CONT").await?;
    holder
        .exits_with(122, Duration::from_secs(3))
        .await
        .map_err(|e| format!("after a pause past the TTL: {e}"))?;
    let noted = std::fs::read_to_string(&termed).unwrap_or_default();
    if !noted.contains("term") {
        return Err(format!("the command got no SIGTERM: {}", holder.said()));
    }
    Ok(())
}

/// The lock key deleted while the command runs, with a TTL so long that no renewal notices
/// before the command exits 0: the release finds the lock gone, so syncctl exits 122, not 0.
async fn loss_found_at_release_is_122(base: String) -> TestResult {
    let scratch = Scratch::new()?;
    let ns = unique("atrelease");
    let url = services::url(&base, &ns, "ttl=30s");
    let ready = scratch.path("ready");
    let mut command = syncctl(
        Some(&url),
        &["lock", "X", "--", "sh", "-c", r#"echo $$ > "$R"; sleep 2"#],
    );
    command.env("R", &ready);
    let mut holder = Proc::spawn(&scratch, command)?;
    pid_in(&ready, &mut holder, STARTUP).await?;
    services::break_holds(Live::Redis, &base, &ns).await?;
    holder.exits_with(122, Duration::from_secs(15)).await
}

/// What the command left running in its process group (`sleep &`) is ended before the lock is
/// released: nothing it started runs on without the lock.
async fn leftovers_end_before_release(base: String) -> TestResult {
    let scratch = Scratch::new()?;
    let url = services::url(&base, &unique("leftovers"), "");
    let pidfile = scratch.path("pid");
    let script = r#"sleep 300 & echo $! > "$P""#;
    let mut command = syncctl(
        Some(&url),
        &["lock", "X", "--grace", "1s", "--", "sh", "-c", script],
    );
    command.env("P", &pidfile);
    output(command, Duration::from_secs(20)).await?.ok()?;
    let text = std::fs::read_to_string(&pidfile).map_err(|e| format!("reading the pid: {e}"))?;
    let pid: u32 = text.trim().parse().map_err(|e| format!("{text:?}: {e}"))?;
    if alive(pid) {
        return Err(format!(
            "the command's background sleep ({pid}) outlived syncctl"
        ));
    }
    Ok(())
}

/// Under `trap "" HUP` (as under nohup) syncctl leaves SIGHUP ignored, for itself and for its
/// command: a hangup changes nothing, and the command finishes.
async fn an_ignored_hangup_stays_ignored(base: String) -> TestResult {
    let scratch = Scratch::new()?;
    let url = services::url(&base, &unique("nohup"), "");
    let (ready, finished) = (scratch.path("ready"), scratch.path("finished"));
    let script = r#"echo $$ > "$R"; sleep 1; echo yes > "$F""#;
    let line =
        format!(r#"trap '' HUP; exec "$SYNCCTL" --backend '{url}' lock X -- sh -c '{script}'"#);
    let mut command = tokio::process::Command::new("sh");
    command
        .args(["-c", &line])
        .env("SYNCCTL", env!("CARGO_BIN_EXE_syncctl"))
        .env("R", &ready)
        .env("F", &finished);
    let mut holder = Proc::spawn(&scratch, command)?;
    pid_in(&ready, &mut holder, STARTUP).await?;
    holder.signal("HUP").await?;
    holder.exits_with(0, Duration::from_secs(15)).await?;
    if !finished.exists() {
        return Err("the command did not finish after an ignored hangup".into());
    }
    Ok(())
}
