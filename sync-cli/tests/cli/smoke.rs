//! The other commands once each on every backend that has them: map, task, elect/leader on
//! etcd, redis and consul; time on ntp.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    harness::{Case, Live, TestResult},
    procs::{Out, Proc, Scratch, line_in, output, poll, syncctl},
    services::{self, unique},
};

/// How long one command may take (a task run waits for a worker).
const LIMIT: Duration = Duration::from_secs(40);

pub fn cases(out: &mut Vec<Case>) {
    for live in [Live::Etcd, Live::Redis, Live::Consul] {
        let name = |test: &str| format!("smoke::{test}::{}", live.name());
        out.push(Case::live(name("map"), live, map_commands));
        out.push(Case::live(name("task"), live, task_commands));
        out.push(Case::live(name("elect_and_leader"), live, elect_and_leader));
        out.push(Case::live(
            name("leader_follow_outlives_an_outage"),
            live,
            follow_outlives_an_outage,
        ));
    }
    out.push(Case::live(
        "config::precedence::etcd".into(),
        Live::Etcd,
        config_precedence,
    ));
    out.push(Case::live(
        "smoke::time::ntp".into(),
        Live::Ntp,
        time_command,
    ));
}

/// `syncctl --backend URL ARGS` to its end.
async fn ctl(url: &str, args: &[&str]) -> Result<Out, String> {
    output(syncctl(Some(url), args), LIMIT).await
}

/// The version a `map put` or `map cas` printed.
fn version(out: &Out) -> Result<u64, String> {
    out.stdout
        .trim()
        .parse()
        .map_err(|e| format!("no version printed ({e}): {}", out.said()))
}

/// `got` is `want`.
fn same<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> TestResult {
    if got != want {
        return Err(format!("{what}: got {got:?}, expected {want:?}"));
    }
    Ok(())
}

/// put, get (raw and --json), cas (matching, mismatched, --absent), ls (text and --json) and
/// del (mismatched, matching, absent).
async fn map_commands(base: String) -> TestResult {
    let url = services::url(&base, &unique("map"), "");
    let v1 = version(&ctl(&url, &["map", "put", "m", "k", "v1"]).await?.ok()?)?;
    let raw = ctl(&url, &["map", "get", "m", "k"]).await?.ok()?;
    same("map get's stdout", raw.stdout.as_str(), "v1")?;
    let got = ctl(&url, &["--json", "map", "get", "m", "k"]).await?.ok()?;
    let want = json!({"key": "k", "version": v1, "value": "v1"});
    same("map get --json", got.json()?, want)?;
    let v1s = v1.to_string();
    let v2 = version(
        &ctl(&url, &["map", "cas", "m", "k", "--expect", &v1s, "v2"])
            .await?
            .ok()?,
    )?;
    if v2 == v1 {
        return Err(format!("the cas left the version at {v1}"));
    }
    let stale = ctl(&url, &["map", "cas", "m", "k", "--expect", &v1s, "v3"]).await?;
    stale
        .fails(1)
        .map_err(|e| format!("a cas at a stale version: {e}"))?;
    let raw = ctl(&url, &["map", "get", "m", "k"]).await?.ok()?;
    same("the value after a failed cas", raw.stdout.as_str(), "v2")?;
    let absent = ["map", "cas", "m", "k2", "--absent", "x"];
    let v3 = version(&ctl(&url, &absent).await?.ok()?)?;
    let taken = ctl(&url, &absent).await?;
    taken
        .fails(1)
        .map_err(|e| format!("a cas --absent of a present key: {e}"))?;
    let listed = ctl(&url, &["--json", "map", "ls", "m"]).await?.ok()?;
    let mut entries = listed.json()?.as_array().cloned().unwrap_or_default();
    entries.sort_by_key(|e| e["key"].to_string());
    let want = json!([
        {"key": "k", "version": v2, "value": "v2"},
        {"key": "k2", "version": v3, "value": "x"},
    ]);
    same("map ls --json", Value::Array(entries), want)?;
    let text = ctl(&url, &["map", "ls", "m"]).await?.ok()?;
    let mut lines: Vec<&str> = text.stdout.lines().collect();
    lines.sort_unstable();
    same(
        "map ls",
        lines,
        vec![&*format!("k\t{v2}\tv2"), &*format!("k2\t{v3}\tx")],
    )?;
    let stale = ctl(&url, &["map", "del", "m", "k", "--expect", &v1s]).await?;
    stale
        .fails(1)
        .map_err(|e| format!("a del at a stale version: {e}"))?;
    ctl(&url, &["map", "del", "m", "k", "--expect", &v2.to_string()])
        .await?
        .ok()?;
    let gone = ctl(&url, &["map", "get", "m", "k"]).await?;
    gone.fails(1)
        .map_err(|e| format!("a get of a deleted key: {e}"))?;
    let gone = ctl(&url, &["map", "del", "m", "k"]).await?;
    gone.fails(1)
        .map_err(|e| format!("a del of an absent key: {e}"))?;
    let put = ctl(&url, &["--json", "map", "put", "m", "k3", "x"])
        .await?
        .ok()?;
    let put = put.json()?;
    if put["key"] != "k3" || !put["version"].is_u64() {
        return Err(format!("map put --json printed {put}"));
    }
    Ok(())
}

/// Workers upcasing payloads and failing (exit 3): run, a failed run, submit and status; then
/// the workers stop on SIGTERM with status 0.
async fn task_commands(base: String) -> TestResult {
    let scratch = Scratch::new()?;
    let url = services::url(&base, &unique("task"), "");
    let worker = |name: &str, script: &str| {
        let args = ["task", "worker", name, "--", "sh", "-c", script];
        Proc::spawn(&scratch, syncctl(Some(&url), &args))
    };
    let mut upper = worker("upper", "tr a-z A-Z")?;
    let mut failing = worker("failing", "exit 3")?;
    let run = ctl(&url, &["task", "run", "upper", "hello", "--timeout", "30s"]).await?;
    let run = run
        .ok()
        .map_err(|e| format!("{e}; the worker: {}", upper.said()))?;
    same("task run's output", run.stdout.as_str(), "HELLO")?;
    let args = [
        "task",
        "run",
        "failing",
        "x",
        "--max-attempts",
        "1",
        "--timeout",
        "30s",
    ];
    let failed = ctl(&url, &args).await?;
    failed.fails(1).map_err(|e| {
        format!(
            "a job whose command exits 3: {e}; the worker: {}",
            failing.said()
        )
    })?;
    let submitted = ctl(&url, &["task", "submit", "upper", "hi"]).await?.ok()?;
    let id = submitted.stdout.trim();
    if id.is_empty() || id.contains(char::is_whitespace) {
        return Err(format!("task submit printed no id: {}", submitted.said()));
    }
    let status = ctl(&url, &["--json", "task", "status", id, "--wait", "30s"])
        .await?
        .ok()?;
    let status = status.json()?;
    same("the job's id", &status["id"], &json!(id))?;
    same("the job's name", &status["name"], &json!("upper"))?;
    same("the job's state", &status["state"], &json!("succeeded"))?;
    same("the job's output", &status["output"], &json!("HI"))?;
    let unknown = ctl(&url, &["task", "status", "no-such-job"]).await?;
    unknown
        .fails(1)
        .map_err(|e| format!("task status of an unknown job: {e}"))?;
    for w in [&mut upper, &mut failing] {
        w.signal("TERM").await?;
        w.exits_with(0, Duration::from_secs(15)).await?;
    }
    Ok(())
}

/// `elect g --id me --value v` leads: `leader g` shows it (human and --json, with the term
/// its command got), `elect g --id other --wait 1s` gives up (124); after SIGTERM the leader
/// resigns and `leader g` says there is none (1).
async fn elect_and_leader(base: String) -> TestResult {
    let scratch = Scratch::new()?;
    let url = services::url(&base, &unique("elect"), "");
    let term_file = scratch.path("term");
    let lead = r#"echo $SYNC_TERM > "$F"; exec sleep 30"#;
    let args = [
        "elect", "g", "--id", "me", "--value", "v", "--", "sh", "-c", lead,
    ];
    let mut command = syncctl(Some(&url), &args);
    command.env("F", &term_file);
    let mut leader = Proc::spawn(&scratch, command)?;
    let term = line_in(&term_file, &mut leader, Duration::from_secs(15)).await?;
    let term: u64 = term
        .trim()
        .parse()
        .map_err(|e| format!("SYNC_TERM is {term:?}: {e}"))?;
    let shown = ctl(&url, &["--json", "leader", "g"]).await?.ok()?;
    let want = json!({"group": "g", "leader": {"candidate": "me", "term": term, "value": "v"}});
    same("leader --json", shown.json()?, want)?;
    let shown = ctl(&url, &["leader", "g"]).await?.ok()?;
    same("leader", shown.stdout, format!("me term={term} value=v\n"))?;
    let other = ["elect", "g", "--id", "other", "--wait", "1s", "--", "true"];
    ctl(&url, &other)
        .await?
        .code(124)
        .map_err(|e| format!("a second candidate while one leads: {e}"))?;
    leader.signal("TERM").await?;
    // Its command (sleep) dies of the SIGTERM passed on: its status is syncctl's.
    leader.exits_with(143, Duration::from_secs(10)).await?;
    let none = ctl(&url, &["leader", "g"]).await?;
    let line = none
        .fails(1)
        .map_err(|e| format!("after the leader resigned: {e}"))?;
    if !line.contains("no leader") {
        return Err(format!("after the leader resigned: {}", none.said()));
    }
    Ok(())
}

/// `leader g --follow` through a backend that is cut off for a while says so on stderr, keeps
/// following, and prints the leader elected once the backend is back.
async fn follow_outlives_an_outage(base: String) -> TestResult {
    use sync_conformance::proxy::{Fault, FaultProxy, hosts, through};

    let scratch = Scratch::new()?;
    let url = services::url(&base, &unique("follow"), "");
    let server = hosts(&url)
        .and_then(|h| h.first().copied())
        .ok_or("no server address")?;
    let proxy = (FaultProxy::start(server).await).map_err(|e| format!("proxy: {e}"))?;
    let proxied = through(&url, proxy.addr());
    let mut follower = Proc::spawn(
        &scratch,
        syncctl(Some(&proxied), &["leader", "g", "--follow"]),
    )?;
    printed(&follower, "g: no leader")
        .await
        .ok_or_else(|| format!("no first report: {}", follower.said()))?;
    proxy.set(Fault::Reset);
    poll(LIMIT, || (!follower.stderr().is_empty()).then_some(()))
        .await
        .ok_or_else(|| format!("the outage was not told: {}", follower.said()))?;
    proxy.set(Fault::Pass);
    follower.running()?;
    let mut leader = Proc::spawn(
        &scratch,
        syncctl(
            Some(&url),
            &["elect", "g", "--id", "me", "--", "sleep", "30"],
        ),
    )?;
    let seen = printed(&follower, "me term=").await;
    leader.signal("TERM").await?;
    leader.exits_with(143, Duration::from_secs(10)).await?;
    seen.ok_or_else(|| {
        format!(
            "the leader elected after the outage was not printed: {}",
            follower.said()
        )
    })?;
    follower.running()?;
    follower.signal("TERM").await?;
    follower
        .exits_within(Duration::from_secs(10))
        .await
        .map(drop)
}

/// Whether `proc` printed `what` on stdout within [`LIMIT`].
async fn printed(proc: &Proc, what: &str) -> Option<()> {
    poll(LIMIT, || proc.stdout().contains(what).then_some(())).await
}

/// `time --json`: now, earliest and latest as RFC 3339 (UTC, nanoseconds), in order.
async fn time_command(base: String) -> TestResult {
    let out = ctl(&base, &["--json", "time"]).await?.ok()?;
    let json = out.json()?;
    let field = |key: &str| {
        json[key]
            .as_str()
            .filter(|t| t.len() == "2024-01-01T00:00:00.000000000Z".len() && t.ends_with('Z'))
            .ok_or_else(|| format!("{key} is no RFC 3339 UTC time with nanoseconds: {json}"))
    };
    let (earliest, now, latest) = (field("earliest")?, field("now")?, field("latest")?);
    // Same width, same zone: the text order is the time order.
    if !(earliest <= now && now <= latest) {
        return Err(format!("not earliest <= now <= latest: {json}"));
    }
    if !json["uncertainty_ns"].is_u64() {
        return Err(format!("uncertainty_ns is no count of nanoseconds: {json}"));
    }
    let plain = ctl(&base, &["time"]).await?.ok()?;
    if plain.stdout.lines().count() != 1 {
        return Err(format!("time printed more than a line: {}", plain.said()));
    }
    Ok(())
}

/// The backend comes from --backend, else SYNC_BACKEND, else --config FILE: each source writes
/// into a namespace of its own, and each value is read back where it should have landed.
async fn config_precedence(base: String) -> TestResult {
    let scratch = Scratch::new()?;
    let [from_file, from_env, from_flag] = ["file", "env", "flag"].map(unique);
    let file = scratch.path("sync.toml");
    let endpoint = services::first_host(&base);
    let toml =
        format!("backend = \"etcd\"\nendpoints = [\"{endpoint}\"]\nnamespace = \"{from_file}\"\n");
    std::fs::write(&file, toml).map_err(|e| format!("writing the config: {e}"))?;
    let config = file.to_str().ok_or("a config path that is not UTF-8")?;
    let env_url = services::url(&base, &from_env, "");
    let flag_url = services::url(&base, &from_flag, "");
    let put = |value: &'static str| ["--config", config, "map", "put", "m", "k", value];
    output(syncctl(None, &put("file")), LIMIT).await?.ok()?;
    let mut with_env = syncctl(None, &put("env"));
    with_env.env("SYNC_BACKEND", &env_url);
    output(with_env, LIMIT).await?.ok()?;
    let mut with_flag = syncctl(Some(&flag_url), &put("flag"));
    with_flag.env("SYNC_BACKEND", &env_url);
    output(with_flag, LIMIT).await?.ok()?;
    for (ns, want) in [
        (&from_file, "file"),
        (&from_env, "env"),
        (&from_flag, "flag"),
    ] {
        let url = services::url(&base, ns, "");
        let got = ctl(&url, &["map", "get", "m", "k"]).await?.ok()?;
        same(
            &format!("the value in namespace {ns}"),
            got.stdout.as_str(),
            want,
        )?;
    }
    Ok(())
}
